"""Reading a run config: a YAML file or shipped recipe, dotted command-line overrides, then validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clipforge.config.convert import build_dataclass, config_to_dict
from clipforge.config.data_section import DataConfig
from clipforge.config.data_upgrade import is_format1_data_section, upgrade_data_section
from clipforge.config.errors import ConfigError
from clipforge.config.recipes import resolve_config_path
from clipforge.config.schema import Config
from clipforge.config.validation import validate
from clipforge.io import atomic_write_text, shorten

# Bounds on what a YAML file may make clipforge build: a config is a few kilobytes, so these only stop files
# that are not configs, and documents that grow when read (an "alias bomb": a few lines whose anchors and
# aliases expand to billions of nodes, which even the message about a wrong value would print whole).
MAX_YAML_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 64  # nested mappings and lists
MAX_YAML_NODES = 100_000  # values after expanding every alias

# the first line of every config.yaml clipforge writes: how a run folder tells its own config from a user's
WRITTEN_HEADER = "# written by clipforge: the resolved config of the run in this folder"


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document nested deeper than :data:`MAX_YAML_DEPTH` or holding more than
    :data:`MAX_YAML_NODES` values once its aliases are expanded, before any Python object is built."""

    def compose_document(self):  # noqa: ANN201 - PyYAML's signature
        node = super().compose_document()
        _check_expanded_size(node, self.name)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # PyYAML keeps the last of two equal keys; the first one's values would be silently ignored
        # (a merge key "<<" brings defaults that the mapping's own keys may override: that is not a repeat)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise ConfigError(
                    f"{self.name}: the key {key_node.value[:40]!r} appears twice in one mapping (line "
                    f"{key_node.start_mark.line + 1}); only the last would count: keep one"
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Count ``root``'s values with every alias expanded (each shared node counted once per use), in linear time:
    a node's expanded size is memoized by identity, so a billion-node alias bomb costs a few hundred steps."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; a config is not")
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_YAML_NODES + 1  # a node that (through aliases) contains itself is too large
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_YAML_NODES:
                break
        sizes[id(node)] = total
        return total

    if root is not None and size(root, 0) > MAX_YAML_NODES:
        raise ConfigError(
            f"{where}: expands to more than {MAX_YAML_NODES:,} values (its aliases repeat anchored parts); a config "
            "is far smaller: write the values out"
        )


def load_yaml(text: str, where: str) -> Any:
    """The YAML document ``text`` (from ``where``, for messages) within the bounds above; ConfigError otherwise
    (``yaml.YAMLError`` for text that does not parse, for the caller to word)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters of YAML; a config is at most {MAX_YAML_BYTES:,}")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values (missing keys keep defaults)."""
    config = build_dataclass(Config, values or {})
    validate(config)
    return config


def data_config_from_dict(
    values: dict[str, Any], overrides: list[str] | None = None, prefix: str = "data"
) -> DataConfig:
    """A :class:`DataConfig` alone (``clipforge eval --data``): ``values`` with ``key=value`` overrides applied
    (``split=test``, ``augment.scale_min=1``), checked with the same schema and rules as the ``data`` section."""
    values = dict(values or {})
    if is_format1_data_section(values):  # the data section of a config.yaml an older clipforge wrote
        values = upgrade_data_section({"data": values})["data"]
    _apply_overrides(values, overrides or [], data_section=())
    data = build_dataclass(DataConfig, values, prefix)
    data.validate(prefix)
    return data


def _apply_overrides(
    tree: dict[str, Any], overrides: list[str], data_section: tuple[str, ...] = ("data",)
) -> dict[str, Any]:
    """``tree`` with the dotted ``overrides`` set, in order. An override of the data section's ``kind`` (the
    section at ``data_section``) that names another kind than the file's starts a new source: the file's section
    keeps only the fields every kind shares (workers, augmentation, caption sampling, feature cache ...), not
    those written for the kind it replaces; the other overrides then apply to it whatever their order."""
    pairs = parse_overrides(overrides)
    kinds = [value for key, value in pairs if key.split(".") == [*data_section, "kind"]]
    section: Any = tree
    for part in data_section:
        section = section.get(part) if isinstance(section, dict) else None
    if kinds and isinstance(section, dict) and "kind" in section and section["kind"] != kinds[-1]:
        shared = DataConfig.shared_fields()
        kept = {key: item for key, item in section.items() if key in shared}
        section.clear()
        section.update(kept)
    for key, value in pairs:
        _set_dotted(tree, key, value)
    return tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shorten(dotted)!r}: {shorten(part)!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.batch_size=64", "loss.kind=siglip"]`` -> ``[("train.batch_size", 64), ...]``.

    Values are read as YAML scalars, so ``64`` is an int, ``1e-3`` a float, ``null`` None and
    ``[0.5, 0.5, 0.5]`` a list.
    """
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shorten(item)!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"override {shorten(item)!r}") if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {shorten(item)!r}: the value is not valid YAML ({_yaml_problem(error)}); "
                "quote a string that holds ':', '[' or '{' (key='\"a: b\"')"
            ) from None
        parsed.append((key.strip(), value))
    return parsed


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, and where (1-based line and column), in one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path`` (:func:`load_yaml`'s bounds: at most 1 MiB, read no further); a ConfigError
    naming the file, line and column when it does not parse, and the problem when it is not a readable file."""
    path = Path(path)
    where = shorten(str(path), 200)
    if not path.is_file():
        raise ConfigError(f"{where} is not a file; expected a YAML config")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{where} cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_YAML_BYTES:,} bytes; a YAML config is far smaller")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where} is not UTF-8 text (a bad byte at offset {error.start}); save it as UTF-8") from None
    try:
        return load_yaml(text, where)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(error)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or shipped recipe (or start from defaults), apply dotted overrides, validate.

    An override of ``data.kind`` that names another kind than the file's starts a new source: the file's data
    section keeps only the fields every kind shares. A data section as an older clipforge wrote it (every field of
    every kind) is read as :func:`~clipforge.config.data_upgrade.upgrade_data_section` upgrades it."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = read_yaml(path)
        if loaded is None:
            # an empty file would silently train every default: refuse it rather than guess what was meant
            raise ConfigError(
                f"{path} is empty: a config needs its sections (model, data, train, ...); "
                "to train a shipped recipe pass its name, e.g. clipforge train demo"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        values = loaded
    if is_format1_data_section(values.get("data")):  # the config.yaml of a run of an older clipforge
        values = upgrade_data_section(values)
    _apply_overrides(values, overrides or [])
    return config_from_dict(values)


def save_config(config: Config, path: str | Path, replace: bool = False) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back to an equal config), headed by
    :data:`WRITTEN_HEADER`; ``replace``: the caller owns an existing ``path`` (see ``clipforge.io.atomic_write``)."""
    text = WRITTEN_HEADER + "\n" + yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(path, text, replace=replace)


def written_by_clipforge(path: str | Path) -> bool:
    """Whether the YAML file ``path`` is a config clipforge wrote (it starts with :data:`WRITTEN_HEADER`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().rstrip("\n") == WRITTEN_HEADER
    except OSError:
        return False
