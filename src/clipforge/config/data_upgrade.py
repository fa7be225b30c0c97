"""Data sections of older clipforge versions -> today's per-kind layout, on plain values.

Until the data kinds had a class each, a data section was one 22-field union, and ``config_to_dict`` wrote every
field for every kind: checkpoints of format 1 and the ``config.yaml`` of their runs hold a manifest with
``split: train``, ``name: ''``, ``epoch_size: null`` and so on. No reader looked at the fields of other kinds, so
dropping them changes nothing the run did.
"""

from __future__ import annotations

import copy
from typing import Any

from clipforge.config.data_kinds import DATA_KINDS
from clipforge.config.data_section import DEFAULT_DATA_KIND

# the fields of the old union, in its order (what a format-1 data section holds, for every kind)
FORMAT1_DATA_FIELDS = (
    "kind",
    "name",
    "captions",
    "path",
    "image_root",
    "split",
    "classnames",
    "image_column",
    "caption_column",
    "label_column",
    "caption_sampling",
    "caption_templates",
    "epoch_size",
    "shuffle_buffer",
    "resample",
    "mix",
    "weight",
    "num_workers",
    "augment",
    "cache_features",
    "cached_views",
    "feature_cache",
)


def upgrade_data_section(values: dict[str, Any]) -> dict[str, Any]:
    """A whole config in plain values (``config_to_dict``'s layout, e.g. a format-1 checkpoint's ``config``) with
    every data section in today's per-kind layout.

    In ``values['data']``, in each of its ``mix`` entries and in each ``values['eval']['tasks'][i]['data']``, the
    fields of the old union that the section's kind does not have are dropped (they did nothing then); everything
    else is kept as it is, unchecked (``config_from_dict`` checks the result). A section without ``kind`` is the
    default kind's (``emoji``); a section that is not a mapping, or names no known kind, and keys that no version
    knew are left as they are, for ``config_from_dict`` to refuse with its own message.

    Pure: ``values`` is not changed and the result shares no mutable part with it. Upgrading an upgraded config (or
    one written by today's clipforge) changes nothing.
    """
    upgraded = copy.deepcopy(values)
    if not isinstance(upgraded, dict):
        return upgraded
    if "data" in upgraded:
        upgraded["data"] = _upgrade(upgraded["data"])
    evaluation = upgraded.get("eval")
    tasks = evaluation.get("tasks") if isinstance(evaluation, dict) else None
    for task in tasks if isinstance(tasks, list) else []:
        if isinstance(task, dict) and "data" in task:
            task["data"] = _upgrade(task["data"])
    return upgraded


def is_format1_data_section(section: Any) -> bool:
    """Whether ``section`` holds every field of the old union: a data section as clipforge wrote it before the data
    kinds had a class each (a hand-written one never names all of them)."""
    return isinstance(section, dict) and all(name in section for name in FORMAT1_DATA_FIELDS)


def _upgrade(section: Any) -> Any:
    if not isinstance(section, dict):
        return section
    kind = section.get("kind", DEFAULT_DATA_KIND)
    cls = DATA_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return section
    kept = {
        key: value
        for key, value in section.items()
        if key not in FORMAT1_DATA_FIELDS or key in cls.__dataclass_fields__
    }
    if isinstance(kept.get("mix"), list):
        kept["mix"] = [_upgrade(entry) for entry in kept["mix"]]
    return kept
