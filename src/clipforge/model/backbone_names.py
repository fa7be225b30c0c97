"""Names of library backbones checked before anything is built, so a typo reads as a config error with the
names it was probably meant to be (``difflib`` over the library's own registry), not a library traceback.

Both registries are local tables: checking a name never touches the network.
"""

from __future__ import annotations

import difflib

from clipforge.config import ConfigError

# how many close names an error suggests
SUGGESTIONS = 5


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=SUGGESTIONS, cutoff=0.6)
    return f"; did you mean one of {close}?" if close else ""


def check_torchvision_name(name: str) -> None:
    """Raise ConfigError when ``name`` is not a model ``torchvision.models.get_model`` builds."""
    from torchvision.models import list_models

    known = list_models()
    if name.lower() not in known:  # get_model looks names up in lower case
        raise ConfigError(
            f"model.image.name={name!r} is not a torchvision model{_did_you_mean(name.lower(), known)} "
            "(torchvision.models.list_models() lists them all)"
        )


def check_timm_name(name: str, tag_field: str = "model.image.name") -> None:
    """Raise ConfigError when ``name`` (``architecture`` or ``architecture.tag``) is not in timm's registry.

    ``tag_field``: the config field the tag came from (``model.image.name``, or ``model.image.pretrained`` when
    ``pretrained`` names the tag). Names with a source prefix (``hf-hub:...``, ``local-dir:...``) are timm's to
    resolve and pass unchecked.
    """
    import timm

    if ":" in name:
        return
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise ConfigError(
            f"model.image.name={architecture!r} is not a timm model"
            f"{_did_you_mean(architecture, timm.list_models())} (timm.list_models('{architecture[:4]}*') lists "
            "similar names)"
        )
    if not tag:
        return
    tags = [full.partition(".")[2] for full in timm.list_pretrained(f"{architecture}.*")]
    if tag not in tags:
        raise ConfigError(
            f"{tag_field}: timm has no pretrained tag {tag!r} for {architecture!r}; its tags are {tags[:10]}"
            f"{' ...' if len(tags) > 10 else ''}"
        )
