"""Recipes: named YAML configs shipped inside the package (``clipforge train demo`` finds ``demo.yaml``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from clipforge.config.errors import ConfigError

RECIPES_PACKAGE = "clipforge.configs"


def recipe_names() -> list[str]:
    """Names of the YAML recipes shipped inside the package (``clipforge train demo`` finds them)."""
    return sorted(p.name.removesuffix(".yaml") for p in files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path as given, or the shipped recipe of that name (``demo`` -> .../configs/demo.yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    recipe = files(RECIPES_PACKAGE) / f"{spec}.yaml"
    if recipe.is_file():
        return Path(str(recipe))
    raise ConfigError(
        f"config {str(spec)!r} is neither a file nor a shipped recipe; recipes: {recipe_names()}, "
        "or pass the path of a YAML file"
    )
