"""ONNX export: one graph per tower, normalized embeddings out, checked against PyTorch with onnxruntime.

``export_onnx(loaded, out_dir)`` writes

* ``image_encoder.onnx``: ``pixel_values`` (batch, 3, S, S) float32, preprocessed as ``preprocess.json`` says
  -> ``image_embeds`` (batch, D), unit L2 norm;
* ``text_encoder.onnx``: ``input_ids``, ``attention_mask`` (batch, length) int64 -> ``text_embeds`` (batch, D);
* ``preprocess.json`` (image size, mean/std, interpolation, the resize rule; the text rule: context length,
  padding, pad id, the caption clean-up before tokenizing) and ``tokenizer/`` (the files of the checkpoint's
  tokenizer);

with the batch (and the text length) dynamic. One file set: the weights sit inside each ``.onnx`` file, unless a graph
passes protobuf's 2 GiB limit, when they go to one ``<graph>.onnx.data`` file beside it (and no other data file is
left). The exporters' own progress lines and warnings are kept out of the command's output. Both graphs carry metadata: ``log_logit_scale`` (the learned log t:
logits = exp(log_logit_scale) * image_embeds @ text_embeds.T, plus ``logit_bias`` when present, a SigLIP model),
``embed_dim``, ``clipforge_version``. After writing, each graph is run with onnxruntime on a
batch size that the export did not trace with and compared with PyTorch; a difference above ``atol`` fails the
export, so a written folder is a checked one. Any tower kind exports (built-in, timm, torchvision, Hugging Face).

``preprocess.json`` says enough to reproduce the pixels without clipforge (its ``resize_rule`` spells it out):
``resize_mode`` ``squash`` resizes the RGB image to ``image_size`` x ``image_size``; ``shortest`` first center-crops
the long side to ``max_aspect`` times the short one (plus one pixel when the cut is odd; only for images beyond
``max_aspect``:1), resizes the short side to ``resize_size`` and the long one to
``int(resize_size * long / short)``, then crops ``image_size`` x ``image_size`` at offsets (resized - image_size) / 2
rounded by ``crop_rounding`` (``round``: Python's ``round``, halves to even; ``floor``: down). The resize is
``PIL.Image.resize`` with filter ``interpolation`` (``resize_backend: pil``) or torchvision's antialiased
``resize`` of the uint8 (3, H, W) tensor (``torchvision``); then pixel / 255, minus ``mean``, over ``std``.

Its ``text_rule`` states the padding: ``max_length`` (a tower that reads its padding: bidirectional attention, CoCa's
class token after the padding) pads every text to ``context_length`` with ``pad_token_id``; ``longest`` pads a batch
on the right to its longest text with ``pad_token_id`` and ``attention_mask`` 0 there, which does not change the
embeddings. ``text_clean`` (open_clip's models: ``lower``, ``canonicalize``, ...) is applied to each caption before
``tokenizer/``, and ``strip_sep_token`` turns the separator id into 0 (``clipforge.data.text_clean``, ``HFTokenizer``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipforge.data.processor import Processor
from clipforge.data.transforms import MAX_ASPECT, ImagePreprocess
from clipforge.folders import staged_folder
from clipforge.io import atomic_write_text, check_output
from clipforge.logs import quiet_loggers
from clipforge.model.factory import LoadedModel
from clipforge.version import __version__

EXPORT_BATCH = 2  # the batch size the graphs are traced with
CHECK_BATCH = 3  # ... and the one they are checked with: a dynamic batch axis must really be dynamic
OPSET = 18
# above this many bytes of weights a graph's tensors go to an external data file (protobuf's limit is 2 GiB)
EXTERNAL_DATA_BYTES = 1536 * 2**20
# the exporters' loggers: their INFO/WARNING lines ("Skipping constant folding ...") are not the user's business
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


class _ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how closely onnxruntime matched PyTorch (max absolute difference)."""

    folder: Path
    image_encoder: Path
    text_encoder: Path
    image_max_difference: float
    text_max_difference: float


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.export's ONNX exporter needs it
    except ImportError as error:
        raise ImportError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'clipforge[onnx]'"
        ) from error
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters' log lines, warnings and prints held back; their errors still raise."""
    with quiet_loggers(EXPORTER_LOGGERS, logging.ERROR), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _export(module: nn.Module, inputs: tuple, names: list[str], output: str, dynamic: dict, path: Path) -> None:
    # torch.export's exporter (dynamo): it traces through the data-dependent branches of the towers (Hugging Face
    # attention masks, torchvision's reshapes) that the TorchScript tracer bakes in at the traced batch, which gave
    # wrong embeddings at other batch sizes. The towers' input checks warn while traced; they only guard layout.
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=names,
            output_names=[output],
            dynamic_axes={**dynamic, output: {0: "batch"}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
        )


def _stamp(path: Path, metadata: dict[str, str]) -> None:
    """Write ``metadata`` into the graph's ``metadata_props`` (what onnxruntime shows as custom metadata); an
    external data file stays as it is (the graph keeps pointing into it)."""
    onnx, _ = _onnx_modules()
    graph = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _used_data_files(path: Path) -> set[str]:
    """The external data files the graph at ``path`` reads."""
    onnx, _ = _onnx_modules()
    graph = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in graph.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _max_difference(path: Path, feeds: dict[str, torch.Tensor], expected: torch.Tensor) -> float:
    _, onnxruntime = _onnx_modules()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: value.numpy() for name, value in feeds.items()})
    return float(np.abs(got - expected.numpy()).max())


def _text_inputs(loaded: LoadedModel, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real token ids of ``batch`` captions of different lengths, so padding is exercised."""
    captions = ["a photo", "a small red circle on a white page", "two dogs", "the letter a", "x"][:batch]
    captions += ["a photo"] * (batch - len(captions))
    tokens = loaded.processor.text(captions)
    return tokens["input_ids"], tokens["attention_mask"]


def preprocess_info(preprocess: ImagePreprocess) -> dict:
    """``preprocess`` as ``preprocess.json`` states it (module docstring), the resize rule in words included."""
    info = {**asdict(preprocess), "max_aspect": MAX_ASPECT}
    for name in ("patch_size", "max_num_patches"):  # the NaFlex resize's own, which ONNX export does not take
        info.pop(name)
    if preprocess.resize_mode == "squash":
        info.pop("resize_size")
        info.pop("crop_rounding")
        rule = f"resize the whole image to {preprocess.image_size} x {preprocess.image_size}"
    else:
        info["resize_size"] = preprocess.short_side
        rule = (
            f"center-crop the long side to {MAX_ASPECT} x the short side if longer (+1 when the cut is odd), resize "
            f"the short side to {preprocess.short_side} and the long side to int({preprocess.short_side} * long / "
            f"short), center-crop {preprocess.image_size} x {preprocess.image_size} at offset (resized - "
            f"{preprocess.image_size}) / 2 rounded {'down' if preprocess.crop_rounding == 'floor' else 'half to even'}"
        )
    library = "PIL.Image.resize" if preprocess.resize_backend == "pil" else "torchvision resize of the uint8 tensor"
    info["resize_rule"] = f"{rule}, {preprocess.interpolation} ({library}); then (pixel / 255 - mean) / std"
    return info


def text_info(processor: Processor) -> dict:
    """The text rule ``preprocess.json`` states (module docstring): context length, padding, pad id, clean-up."""
    tokenizer = processor.tokenizer
    length, pad = processor.context_length, tokenizer.pad_token_id
    info = {"context_length": length, "padding": tokenizer.padding, "pad_token_id": pad}
    if tokenizer.padding == "max_length":
        rule = f"pad every text to context_length={length} tokens with id {pad} (the text tower reads its padding)"
    else:
        rule = (
            f"pad a batch on the right to its longest text (at most {length} tokens) with id {pad} and attention_mask "
            "0 there (padding does not change the embeddings)"
        )
    clean = getattr(tokenizer, "clean", "")
    if clean:
        info["text_clean"] = clean
        rule = f"clean each caption ({clean!r}: clipforge.data.text_clean), tokenize with tokenizer/, then {rule}"
    if getattr(tokenizer, "strip_sep_token", False):
        info["strip_sep_token"] = True
        rule += "; the separator id is replaced by 0"
    info["text_rule"] = rule
    return info


def export_onnx(loaded: LoadedModel, out_dir: str | Path, atol: float = 1e-4) -> OnnxExport:
    """Write the ONNX graphs of ``loaded``'s towers to ``out_dir`` (module docstring), checked with onnxruntime.

    Refuses an ``out_dir`` that already holds an export unless the user asked to overwrite it
    (``clipforge.io.check_output``); the files are written beside it and moved in only once checked
    (``clipforge.io.staged_folder``). Raises ValueError when
    onnxruntime's embeddings differ from PyTorch's by more than ``atol``.
    """
    folder = Path(out_dir)
    if loaded.processor.preprocess.resize_mode == "naflex":
        raise ValueError(
            "the ONNX export takes (batch, 3, S, S) images, and this model's NaFlex image tower (SigLIP 2, variable "
            "resolution) reads packed patches; clipforge export hf writes it as a Siglip2Model"
        )
    for name in ("image_encoder.onnx", "text_encoder.onnx"):  # said now, before the minutes of an export
        check_output(folder / name, what="--out")
    _onnx_modules()
    model = loaded.model.float().eval().cpu()
    preprocess = loaded.processor.preprocess
    size = preprocess.image_size
    generator = torch.Generator().manual_seed(0)
    # named for what it holds, log t, like the model's parameter: a reader must take exp, and cannot miss it
    metadata = {"log_logit_scale": repr(model.log_logit_scale.item()), "clipforge_version": __version__}
    if model.logit_bias is not None:
        metadata["logit_bias"] = repr(model.logit_bias.item())
    with staged_folder(folder, "export onnx") as scratch:
        image_path, text_path = Path(scratch, "image_encoder.onnx"), Path(scratch, "text_encoder.onnx")
        pixels = torch.randn(EXPORT_BATCH, 3, size, size, generator=generator)
        _export(
            _ImageEncoder(model),
            (pixels,),
            ["pixel_values"],
            "image_embeds",
            {"pixel_values": {0: "batch"}},
            image_path,
        )
        ids, mask = _text_inputs(loaded, EXPORT_BATCH)
        text_axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
        _export(_TextEncoder(model), (ids, mask), ["input_ids", "attention_mask"], "text_embeds", text_axes, text_path)
        check_pixels = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
        check_ids, check_mask = _text_inputs(loaded, CHECK_BATCH)
        with torch.no_grad():
            image_expected = model.encode_image(check_pixels)
            text_expected = model.encode_text(check_ids, check_mask)
        embed_dim = str(image_expected.shape[1])
        for path in (image_path, text_path):
            _stamp(path, {**metadata, "embed_dim": embed_dim})
        used = _used_data_files(image_path) | _used_data_files(text_path)
        for data_file in Path(scratch).glob("*.data"):  # one file set: no data file that no graph reads
            if data_file.name not in used:
                data_file.unlink()
        image_difference = _max_difference(image_path, {"pixel_values": check_pixels}, image_expected)
        text_difference = _max_difference(
            text_path, {"input_ids": check_ids, "attention_mask": check_mask}, text_expected
        )
        if max(image_difference, text_difference) > atol:
            raise ValueError(
                f"the ONNX graphs differ from PyTorch by {max(image_difference, text_difference):.2e} (> {atol}): "
                "the export is not faithful for this model; nothing was written"
            )
        info = {**preprocess_info(preprocess), **text_info(loaded.processor), **metadata}
        atomic_write_text(Path(scratch, "preprocess.json"), json.dumps(info, indent=2) + "\n")
        loaded.processor.save_pretrained(Path(scratch, "tokenizer"))
    for name in ("image_encoder.onnx.data", "text_encoder.onnx.data"):  # an earlier export's, replaced (--overwrite)
        if name not in used:
            (folder / name).unlink(missing_ok=True)
    return OnnxExport(
        folder, folder / "image_encoder.onnx", folder / "text_encoder.onnx", image_difference, text_difference
    )
