"""Pretrained weights that work offline: weights shipped inside pip packages, and files in another naming.

Packaged weights (``package:<name>``) are located by :mod:`clipforge.packaged`.

A weights file from another implementation of the same architecture (other parameter names, same
tensors in the same order) loads with ``pretrained_keys: in_order``: :func:`map_state_dict_in_order`
pairs the i-th tensor of the file with the i-th of the model and checks every shape.
"""

from __future__ import annotations

import torch


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
