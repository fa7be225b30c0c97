"""Every shipped recipe loads and builds its model and data pipeline, on tiny stand-ins and offline.

Each recipe keeps its architecture; what a test cannot use is swapped: the data paths point at tiny files
written here in the recipe's format, hub weights are off (``pretrained: null``), the Hugging Face text
tower is a tiny local DistilBERT saved with ``save_pretrained`` (with a tiny local tokenizer), and images
are small. The full-size model is built on the meta device (no memory, no initialization) and a one-layer-deep
copy of it runs the batch. Nothing touches the network.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from clipforge.config import Config, config_from_dict, config_to_dict, load_config, recipe_names
from clipforge.data.loader import LoaderSpec, build_train_loader
from clipforge.data.sources import build_source
from clipforge.data.tokenize import Tokenizer, build_tokenizer
from clipforge.model import CLIPModel
from clipforge.model.factory import build_model, make_processor
from tests.data.test_captioned import write_coco, write_karpathy

BATCH = 4
EXPECTED_RECIPES = {"demo", "coco-resnet50-distilbert", "flickr8k", "flickr30k", "webdataset-vit-b-32"}


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer DistilBERT and a 40-word WordPiece tokenizer in one local folder, like a hub snapshot."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("tiny-distilbert")
    words = "a an the of picture caption red green blue square circle small large 0 1 2 3 4 5 6 7 8 9".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(folder)
    return folder


def stand_in_data(data: dict, folder: Path) -> dict:
    """The data section with its path pointing at tiny files in the recipe's own format."""
    if data["kind"] == "coco":
        return {**data, "path": str(write_coco(folder / "coco")), "image_root": ""}
    if data["kind"] == "flickr":
        return {**data, "path": str(write_karpathy(folder / "flickr")), "image_root": ""}
    if data["kind"] == "webdataset":
        from tests.data.shard_helpers import shapes_samples, write_shards

        return {**data, "path": write_shards(folder / "shards", shapes_samples(), shard_size=10)}
    if data["kind"] in ("emoji", "corpus"):  # built in: shipped with the package
        return data
    if data["kind"] == "mix":
        return {**data, "mix": [stand_in_data(entry, folder / str(i)) for i, entry in enumerate(data["mix"])]}
    raise AssertionError(f"a shipped recipe uses data.kind={data['kind']!r}: give the test a stand-in for it")


_MODELS: dict[str, CLIPModel] = {}  # recipes sharing a model (coco, flickr8k, flickr30k) build it once


def recipe_model(config: Config, tokenizer: Tokenizer) -> CLIPModel:
    """The recipe's model: built full size on the meta device (exact architecture and shapes, no memory, no
    initialization), and for the forward pass with real weights, built-in towers one layer deep."""
    key = json.dumps([config_to_dict(config.model), config.loss.kind, tokenizer.vocab_size], sort_keys=True)
    if key not in _MODELS:
        with torch.device("meta"):
            full_size = build_model(config, tokenizer)
        assert sum(parameter.numel() for parameter in full_size.parameters()) > 0
        shallow = copy.deepcopy(config)
        shallow.model.image.depth = shallow.model.text.depth = 1
        _MODELS[key] = build_model(shallow, tokenizer).eval()
    return _MODELS[key]


def training_captions(source) -> list[str]:
    if hasattr(source, "iter_captions"):  # shards: one pass over the caption members
        return list(source.iter_captions())
    return [caption for index in range(len(source)) for caption in source.captions(index)]


def test_the_recipes_the_readme_names_are_shipped() -> None:
    assert EXPECTED_RECIPES <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds_model_and_data_pipeline_offline(name: str, tmp_path: Path, tiny_distilbert: Path) -> None:
    shipped = load_config(name)  # the file as shipped validates
    values = config_to_dict(shipped)
    image, text = values["model"]["image"], values["model"]["text"]
    image["pretrained"] = None
    image["image_size"] = 2 * image["patch_size"] if image["kind"] == "vit" else 32
    if text["kind"] == "hf":
        text.update(name=str(tiny_distilbert), pretrained=None)
        text["tokenizer"]["name"] = ""
        if text.get("head_init") == "identity":  # an identity head keeps the stand-in tower's 16-d space
            values["model"]["embed_dim"] = 16
    values["data"] = {**stand_in_data(values["data"], tmp_path / "train"), "num_workers": 0}
    for position, task in enumerate(values["eval"]["tasks"]):
        task["data"] = stand_in_data(task["data"], tmp_path / f"eval{position}")
    values["train"].update(batch_size=BATCH, output_dir=str(tmp_path / "run"))
    config = config_from_dict(values)

    for task in config.eval.tasks:
        assert len(build_source(task.data)) > 0
    source = build_source(config.data)
    text_config = config.model.text
    tokenizer = build_tokenizer(text_config.tokenizer, text_config.name, training_captions(source))
    model = recipe_model(config, tokenizer)
    spec = LoaderSpec(
        make_processor(config.model, tokenizer),
        config.data.augment,
        BATCH,
        seed=0,
        caption_sampling=config.data.caption_sampling,
    )
    loader = build_train_loader(source, spec)
    batch = next(iter(loader))
    size = config.model.image.image_size
    assert batch.images.shape == (BATCH, 3, size, size) and batch.images.dtype == torch.float32
    assert batch.input_ids.shape[0] == BATCH and batch.input_ids.shape[1] <= text_config.context_length
    assert batch.attention_mask.shape == batch.input_ids.shape and not batch.skipped
    with torch.no_grad():
        output = model(batch.images, batch.input_ids, batch.attention_mask)
    assert output.image_embeds.shape == (BATCH, config.model.embed_dim)
    assert output.text_embeds.shape == (BATCH, config.model.embed_dim)
    assert (output.logit_bias is not None) == (config.loss.kind == "siglip")


def test_coco_recipe_siglip_override() -> None:
    config = load_config("coco-resnet50-distilbert", ["loss.kind=siglip"])
    assert config.loss.kind == "siglip" and config.model.image.name == "resnet50"
