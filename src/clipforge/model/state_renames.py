"""Renames of :class:`~clipforge.model.CLIPModel` parameters between clipforge versions, as pure functions.

The checkpoint upgrade chain (``clipforge.checkpoint``) calls them on what an older version wrote; they live
with the model because the model's names are what they translate to, and the checkpoint layer may import the
model layer but not ``interop``. Each returns a new dict and leaves its argument as it was.

* ``logit_scale`` -> ``log_logit_scale``: the learned temperature parameter held log t under the name
  ``logit_scale``, the name clipforge's losses and outputs now give the multiplier t itself. Only the key
  changes: the value was and is log t, so it is copied unchanged (no ``exp``, no ``log``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOG_LOGIT_SCALE_KEY", "OLD_LOGIT_SCALE_KEY", "rename_logit_scale", "rename_logit_scale_in_optimizer"]

#: the parameter's name in checkpoints written before the rename (format 1) ...
OLD_LOGIT_SCALE_KEY = "logit_scale"
#: ... and now
LOG_LOGIT_SCALE_KEY = "log_logit_scale"


def _renamed_key(key: Any) -> Any:
    return LOG_LOGIT_SCALE_KEY if key == OLD_LOGIT_SCALE_KEY else key


def rename_logit_scale(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a model state dict with the key ``logit_scale`` renamed ``log_logit_scale``, value unchanged.

    Key order is kept (the renamed key stays where it was). A state that already uses the new name comes back
    as an equal copy, so the function may run on any checkpoint; one with both names is refused with a
    ValueError rather than one of the two values silently dropped.
    """
    if OLD_LOGIT_SCALE_KEY in state and LOG_LOGIT_SCALE_KEY in state:
        raise ValueError(
            f"the model state holds both {OLD_LOGIT_SCALE_KEY!r} (the log temperature before the rename) and "
            f"{LOG_LOGIT_SCALE_KEY!r} (after it): which one is the model's is unknown"
        )
    return {_renamed_key(key): value for key, value in state.items()}


def rename_logit_scale_in_optimizer(saved: dict[str, Any]) -> dict[str, Any]:
    """The same rename in an optimizer state: a copy of ``saved`` (``{"state": ..., "param_groups": [...]}``).

    FSDP checkpoints key the optimizer state by parameter name (``clipforge.distributed.wrap.optimizer_state``):
    there ``logit_scale`` becomes ``log_logit_scale`` among the keys of ``saved["state"]`` and in each group's
    ``params``. A state keyed by number (one process, DDP) has no names and comes back as an equal copy.
    """
    if OLD_LOGIT_SCALE_KEY in saved["state"] and LOG_LOGIT_SCALE_KEY in saved["state"]:
        raise ValueError(
            f"the optimizer state holds both {OLD_LOGIT_SCALE_KEY!r} and {LOG_LOGIT_SCALE_KEY!r}: "
            "which one is the model's is unknown"
        )
    groups = [{**group, "params": [_renamed_key(key) for key in group["params"]]} for group in saved["param_groups"]]
    state = {_renamed_key(key): value for key, value in saved["state"].items()}
    return {**saved, "state": state, "param_groups": groups}
