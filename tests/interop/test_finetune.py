"""``model.init``: a run starts from imported weights (Hugging Face, open_clip or a clipforge checkpoint) with the
architecture, tokenizer and preprocessing they bring, and the run's own locking and learning-rate settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge import from_pretrained
from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import Config, ConfigError, config_from_dict
from clipforge.interop.load import init_model
from tests.interop.tiny_models import CAPTIONS, CONTEXT_LENGTH, IMPORTED_LOG_LOGIT_SCALE, image_batch, write_hf_clip


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_clip(tmp_path_factory.mktemp("finetune") / "clip")


def finetune_config(init: str, manifest: Path, output_dir: Path, model: dict | None = None, **sections) -> Config:
    values = {
        "model": {"init": init, **(model or {})},
        "data": {"kind": "manifest", "path": str(manifest), "augment": {"scale_min": 0.9}},
        "optim": {"lr": 1e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 3},
        "train": {"steps": 20, "batch_size": 8, "output_dir": str(output_dir), "checkpoint_every": 10, "seed": 0},
        "logging": {"log_every": 2, "backends": [], "progress": False},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return config_from_dict(values)


def assert_same_outputs(model_a, model_b) -> None:
    loaded = model_a
    ids = torch.randint(0, 49406, (len(CAPTIONS), CONTEXT_LENGTH))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = loaded(image_batch(), ids, mask), model_b(image_batch(), ids, mask)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)


def test_init_model_brings_the_imported_architecture_weights_and_tokenizer(
    hf_clip: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    model_section = {"image": {"lock": "all-but-last-1", "layer_decay": 0.8}, "text": {"lr_scale": 0.5}}
    config = finetune_config(f"hf:{hf_clip}", shapes_manifest, tmp_path / "run", model_section)
    initial = init_model(config)
    imported = from_pretrained(f"hf:{hf_clip}")
    image, text = initial.config.model.image, initial.config.model.text
    assert (image.width, image.depth, image.image_size, text.vocab_size) == (64, 2, 32, 49408)
    assert (image.lock, image.layer_decay, text.lr_scale) == ("all-but-last-1", 0.8, 0.5)  # the run's own
    assert initial.config.model.init == f"hf:{hf_clip}" and initial.config.train == config.train
    assert initial.tokenizer.state_dict() == imported.tokenizer.state_dict()
    assert_same_outputs(initial.model.eval(), imported.model)
    tower = initial.model.image_tower
    assert not tower.patch_embed.weight.requires_grad and not tower.transformer.blocks[0].attn.qkv.weight.requires_grad
    assert tower.transformer.blocks[1].attn.qkv.weight.requires_grad  # all but the last block locked


def test_init_from_an_imported_clipforge_checkpoint(hf_clip: Path, shapes_manifest: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "imported.pt"
    assert main(["import", f"hf:{hf_clip}", "--out", str(checkpoint)]) == 0
    initial = init_model(finetune_config(str(checkpoint), shapes_manifest, tmp_path / "run"))
    assert initial.config.model.image.width == 64
    assert_same_outputs(initial.model.eval(), from_pretrained(f"hf:{hf_clip}").model)


def test_a_field_that_disagrees_with_the_import_is_refused(
    hf_clip: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    config = finetune_config(f"hf:{hf_clip}", shapes_manifest, tmp_path / "run", {"image": {"width": 128, "heads": 4}})
    with pytest.raises(ConfigError, match=r"brings its own model.image.width=64, but the config sets 128"):
        init_model(config)


def test_a_loss_that_does_not_fit_the_import_is_refused(hf_clip: Path, shapes_manifest: Path, tmp_path: Path) -> None:
    config = finetune_config(f"hf:{hf_clip}", shapes_manifest, tmp_path / "run", loss={"kind": "siglip"})
    with pytest.raises(
        ConfigError, match=r"is a clip model \(no logit bias\) but loss.kind='siglip': set loss.kind=clip"
    ):
        init_model(config)


def test_model_init_must_look_like_a_spec() -> None:
    for init in ("open_clip:", "hf:", " open_clip:ViT-B-32"):
        with pytest.raises(ConfigError, match="open_clip:CONFIG.json:WEIGHTS"):
            config_from_dict({"model": {"init": init}})


def test_fine_tuning_an_imported_model_lowers_the_loss_and_resumes_exactly(
    hf_clip: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    from clipforge.train.loop import train
    from clipforge.train.run_log import read_metrics

    imported = tmp_path / "imported"  # a copy, removed before the resume: the checkpoint alone must do
    shutil.copytree(hf_clip, imported)
    config = finetune_config(
        f"hf:{imported}",
        shapes_manifest,
        tmp_path / "run",
        {"image": {"layer_decay": 0.9}},
        train={"keep_checkpoints": 2},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(config)
        final = read_checkpoint(full.checkpoint)
        # the imported logit scale survives 20 small steps; a run from scratch starts at log(1 / 0.07) = 2.66
        assert abs(float(final.weights["log_logit_scale"]) - IMPORTED_LOG_LOGIT_SCALE) < 0.1
        assert final.config.model.image.width == 64 and final.config.model.init == f"hf:{imported}"
        losses = [record["loss"] for record in read_metrics(full.output_dir / "metrics.jsonl")]
        assert sum(losses[-2:]) / 2 < 0.75 * losses[0], losses

        shutil.rmtree(imported)  # resuming rebuilds the model from the checkpoint: nothing is imported again
        resumed = train(config, resume=tmp_path / "run" / "step_10.pt")
    finally:
        torch.set_num_threads(threads)
    continued = read_checkpoint(resumed.checkpoint).weights
    for key, value in final.weights.items():
        assert torch.allclose(value, continued[key], atol=1e-6), key


def test_resuming_with_another_init_or_loss_is_refused(hf_clip: Path, shapes_manifest: Path, tmp_path: Path) -> None:
    from clipforge.train.loop import train

    run = tmp_path / "run"
    train(finetune_config(f"hf:{hf_clip}", shapes_manifest, run, train={"steps": 2, "checkpoint_every": 2}))
    other_init = finetune_config(f"hf:{tmp_path / 'elsewhere'}", shapes_manifest, run, train={"steps": 4})
    with pytest.raises(ConfigError, match=r"the checkpoint's run started from model.init='hf:.*clip'"):
        train(other_init, resume="latest")
    siglip = finetune_config(f"hf:{hf_clip}", shapes_manifest, run, train={"steps": 4}, loss={"kind": "siglip"})
    with pytest.raises(ConfigError, match="trained with loss.kind='clip'.*set loss.kind=clip"):
        train(siglip, resume="latest")
