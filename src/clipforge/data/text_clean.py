"""Text clean-ups applied before a tokenizer, as open_clip's tokenizers apply them (its ``clean`` setting).

open_clip cleans every caption before tokenizing it, and a model trained that way should meet its captions cleaned
the same way (a SigLIP model never saw a comma or a capital letter). The rules, each on top of the ``basic`` repair:

* ``basic``: mojibake and odd Unicode repaired by ``ftfy.fix_text`` (when ftfy is installed: the ``open_clip``
  extra brings it; without it this step is skipped, which changes only such broken text), HTML entities unescaped
  twice (``&amp;amp;`` -> ``&``), surrounding space stripped.
* ``whitespace``: every run of white space becomes one space.
* ``lower``: ``whitespace``, then lower case (open_clip's own CLIP tokenizer).
* ``canonicalize``: underscores become spaces, every other ASCII punctuation character is removed, lower case, then
  ``whitespace`` (big_vision's rule for SigLIP's captions: "A Dog, running_fast!" -> "a dog running fast").
"""

from __future__ import annotations

import html
import string
from collections.abc import Callable

CLEAN_RULES = ("whitespace", "lower", "canonicalize")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _repair(text: str) -> str:
    try:
        import ftfy
    except ImportError:  # module docstring: only broken text differs
        fixed = text
    else:
        fixed = ftfy.fix_text(text)
    return html.unescape(html.unescape(fixed)).strip()


def _single_spaces(text: str) -> str:
    return " ".join(text.split())


def _whitespace(text: str) -> str:
    return _single_spaces(_repair(text))


def _lower(text: str) -> str:
    return _single_spaces(_repair(text)).lower()


def _canonicalize(text: str) -> str:
    return _single_spaces(_repair(text).replace("_", " ").translate(_NO_PUNCTUATION).lower())


_RULES: dict[str, Callable[[str], str]] = {"whitespace": _whitespace, "lower": _lower, "canonicalize": _canonicalize}


def text_cleaner(rule: str) -> Callable[[str], str]:
    """The clean-up ``rule`` names (module docstring); ValueError for another name."""
    if rule not in _RULES:
        raise ValueError(f"text clean rule {rule!r} is unknown; choose one of {list(CLEAN_RULES)}")
    return _RULES[rule]
