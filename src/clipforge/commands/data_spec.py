"""``--data`` and data SRC/SPEC arguments: a YAML file with a data section and/or ``key=value`` fields."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipforge.config import ConfigError, DataConfig, data_config_from_dict
from clipforge.config.parsing import read_yaml
from clipforge.io import shorten


def parse_data_spec(items: Sequence[str], flag: str = "--data") -> DataConfig:
    """``--data`` -> a validated :class:`DataConfig`.

    ``items`` is either ``key=value`` pairs (``kind=manifest path=test.csv split=test``; dotted keys such as
    ``augment.scale_min=1`` reach nested fields), or a YAML file first, then optional ``key=value`` pairs that
    override it. The YAML holds the data fields at its top level, or a ``data:`` section (a run config works:
    its ``data`` section is used). Paths inside are read as given, relative to the working directory, as in
    run configs. The YAML is read within :func:`clipforge.config.parsing.load_yaml`'s bounds. ``flag`` names the
    argument in messages (``--train-data`` ...).
    """
    items = list(items)
    values: dict = {}
    if items and "=" not in items[0]:
        path = Path(items.pop(0))
        if not path.is_file():
            raise ConfigError(
                f"{flag} {shorten(str(path))!r} is neither a YAML file nor key=value; pass a file holding a data "
                "section, or pairs such as kind=manifest path=test.csv split=test"
            )
        loaded = read_yaml(path)
        if isinstance(loaded, dict) and isinstance(loaded.get("data"), dict):
            loaded = loaded["data"]
        if not isinstance(loaded, dict):
            raise ConfigError(f"{flag} {path}: expected a mapping of data fields (kind, path, split ...)")
        values = loaded
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {shorten(item)!r}: after the YAML file, only key=value pairs can follow")
    try:
        return data_config_from_dict(values, items, prefix="data")
    except ConfigError as error:
        raise ConfigError(f"{flag}: {error}") from error
