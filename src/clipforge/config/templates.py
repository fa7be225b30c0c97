"""The check of ``str.format`` templates with one ``{}`` placeholder, shared by zero-shot prompts
(``clipforge.eval.templates``) and training caption templates (``data.caption_templates``)."""

from __future__ import annotations

from collections.abc import Sequence


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Check a list of templates and return it with CLIP_benchmark's ``{c}`` rewritten to ``{}``.

    Each template must be a string that formats with exactly one class name: one ``{}`` (or ``{c}``), other
    literal braces doubled (``{{``). Raises ``ValueError`` naming the first bad template otherwise.
    """
    if isinstance(templates, str):
        raise ValueError(f"expected a list of templates, got the single string {templates!r}; wrap it in a list")
    templates = list(templates)
    if not templates:
        raise ValueError("need at least one template, got an empty list")
    checked = []
    for position, template in enumerate(templates):
        if not isinstance(template, str):
            raise ValueError(f"template {position} must be a string, got {type(template).__name__}: {template!r}")
        if "{c}" in template and "{}" not in template:
            template = template.replace("{c}", "{}")
        if "{}" not in template:
            raise ValueError(
                f"template {position} {template!r} has no '{{}}' placeholder for the class name, "
                "e.g. 'a photo of a {}.'"
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(
                f"template {position} {template!r} must format with one class name (one '{{}}'; write literal "
                f"braces as '{{{{' and '}}}}'): {error!r}"
            ) from None
        checked.append(template)
    return checked
