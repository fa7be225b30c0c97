"""Pretrained weights that work offline: local state-dict files, weights shipped inside pip packages, and files
in another naming.

Packaged weights (``package:<name>``) are located by :mod:`clipforge.packaged`.

A weights file from another implementation of the same architecture (other parameter names, same
tensors in the same order) loads with ``pretrained_keys: in_order``: :func:`map_state_dict_in_order`
pairs the i-th tensor of the file with the i-th of the model and checks every shape.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clipforge.config import ConfigError, ImageTowerConfig
from clipforge.io import shown
from clipforge.packaged import is_packaged, packaged_entry, packaged_path

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], description: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names by position: the i-th tensor of ``source`` becomes the
    i-th of ``target`` (both in state-dict order).

    BatchNorm ``num_batches_tracked`` counters are left out on both sides (step counts, not weights; some
    exports drop them). Raises ValueError when the counts differ or at the first position whose shapes differ,
    naming both keys: a mapping by position is only trusted when every shape agrees.
    """
    source_keys = [key for key in source if not _is_counter(key)]
    target_keys = [key for key in target if not _is_counter(key)]
    if len(source_keys) != len(target_keys):
        raise ValueError(
            f"in-order weights do not fit {description}: the file has {len(source_keys)} tensors and the model "
            f"{len(target_keys)} (BatchNorm counters not counted); it was saved from another architecture"
        )
    mapped = {}
    for position, (source_key, target_key) in enumerate(zip(source_keys, target_keys, strict=True)):
        source_shape, target_shape = tuple(source[source_key].shape), tuple(target[target_key].shape)
        if source_shape != target_shape:
            raise ValueError(
                f"in-order weights do not fit {description}: tensor #{position} of the file, {source_key!r} "
                f"{source_shape}, meets the model's {target_key!r} {target_shape}; the file comes from another "
                "architecture or variant (check model.image.name), or its tensors are in another order"
            )
        mapped[target_key] = source[source_key]
    return mapped


FILE_PREFIX = "file:"


def names_a_file(pretrained: str) -> bool:
    """Whether ``pretrained`` names a weights file rather than a torchvision enum or timm tag, told from the text
    alone (never by looking whether such a file exists): ``file:<path>``, or a value that reads as a path: a
    folder separator, a leading ``.`` or ``~``, or a weights suffix (``.pt``, ``.pth``, ``.bin``, ``.safetensors``)."""
    return (
        pretrained.startswith(FILE_PREFIX)
        or "/" in pretrained
        or "\\" in pretrained
        or pretrained.startswith((".", "~"))
        or Path(pretrained).suffix in WEIGHT_FILE_SUFFIXES
    )


def local_weights_file(pretrained: str | None) -> Path | None:
    """The local file ``pretrained`` names (``package:<name>``: the file inside that pip package; ``file:`` or a
    path, see :func:`names_a_file`), or None when it names no file (None, ``default``, a tag).

    A value that names a file which does not exist is an error, so a typo in a path never turns into a download
    attempt of a tag of that name, and a file that happens to be called like a tag is never read by accident.
    """
    if pretrained is None or pretrained == "default":
        return None
    if is_packaged(pretrained):
        return packaged_path(pretrained)
    if not names_a_file(pretrained):
        return None
    path = Path(pretrained.removeprefix(FILE_PREFIX)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"pretrained={pretrained!r} names a weights file, but no file exists there; give the path of a "
            ".pt/.pth/.safetensors state dict (or a timm tag / torchvision enum without a path)"
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``).

    A torch file holding ``{"state_dict": {...}}`` (a common training-checkpoint layout) is unwrapped.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path}: not a plain state dict ({shown(exc)}). Save weights with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, not a torch file: one meaning for the user
        raise ConfigError(
            f"{path} cannot be read as weights ({type(exc).__name__}: {shown(str(exc))}); it may be truncated or "
            "not a .pt/.safetensors file: download or save it again"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of parameter name -> tensor, got {type(state).__name__}")
    return state


def state_dict_problems(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    ignore_missing: Callable[[str], bool] = lambda key: False,
    names: tuple[str, str] = ("file", "model"),
) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` (a module's state dict) is: its missing keys
    (but those ``ignore_missing`` accepts), its unexpected keys and its shape mismatches, the first few of each,
    as phrases for an error message; empty when it fits. ``names``: how a mismatch names the two sides."""
    missing = [key for key in expected if key not in state and not ignore_missing(key)]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {names[0]} {tuple(state[key].shape)} vs {names[1]} {tuple(expected[key].shape)}"
        for key in state
        if key in expected and state[key].shape != expected[key].shape
    ]
    problems = [f"missing keys {_first(missing)}"] if missing else []
    problems += [f"unexpected keys {_first(unexpected)}"] if unexpected else []
    problems += [f"shapes differ: {_first(mismatched, 3)}"] if mismatched else []
    return problems


def _first(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def weights_key_order(cfg: ImageTowerConfig) -> str:
    """How ``cfg.pretrained``'s tensors meet the tower's: packaged weights know their own; else ``pretrained_keys``."""
    return packaged_entry(cfg.pretrained).key_order if is_packaged(cfg.pretrained) else cfg.pretrained_keys


def load_weights_file(
    module: nn.Module,
    path: Path,
    description: str,
    drop_prefixes: tuple[str, ...] = (),
    key_order: str = "by_name",
) -> None:
    """Load the state dict in ``path`` into ``module`` strictly, or raise a ValueError that says what differs.

    ``key_order="by_name"``: keys under ``drop_prefixes`` (the classifier the headless tower no longer has) are
    dropped first. ``"in_order"``: the file's tensors are renamed to ``module``'s by position with every shape
    checked (:func:`~clipforge.model.pretrained.map_state_dict_in_order`), so ``module`` must still have the
    classifier the file has. A missing BatchNorm ``num_batches_tracked`` counter is tolerated: it is a step
    count, not a weight.
    """
    state = load_state_dict_file(path)
    if key_order == "in_order":
        state = map_state_dict_in_order(state, module.state_dict(), description)
    state = {
        key: value
        for key, value in state.items()
        if not any(key == prefix or key.startswith(prefix + ".") for prefix in drop_prefixes)
    }
    problems = state_dict_problems(state, module.state_dict(), ignore_missing=_is_counter)
    if problems:
        raise ValueError(
            f"pretrained weights file {str(path)!r} does not fit {description}: {'; '.join(problems)}. "
            f"Fix: point model.image.pretrained at a state dict saved from this same architecture "
            f"(torch.save(model.state_dict(), path)), or change model.image.name/size settings to match the file"
        )
    module.load_state_dict(state, strict=False)  # strictness was checked above, with the counter exception
