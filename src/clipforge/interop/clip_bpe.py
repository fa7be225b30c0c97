"""CLIP's 49,408-token byte-level BPE, built from OpenAI's merges file as open_clip ships it.

OpenAI's tokenizer (``SimpleTokenizer``, open_clip's default) and Hugging Face's ``CLIPTokenizer`` share one
vocabulary: the 256 byte symbols, the same 256 with the end-of-word mark ``</w>``, one token per merge (the first
48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``), then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
(49407). :func:`write_clip_bpe_files` writes that vocabulary as the ``vocab.json`` / ``merges.txt`` pair
transformers reads, so an open_clip checkpoint imports with a tokenizer that gives OpenAI's ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from clipforge.config import CheckpointError
from clipforge.data.hf_loading import quiet_transformers
from clipforge.data.tokenize import HFTokenizer

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # the merges OpenAI's vocabulary uses: 49152 - 256 bytes - 2 special tokens
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE symbols are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in characters), strict=True))


def open_clip_merges_file() -> Path:
    """The merges file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"CLIP's BPE vocabulary comes from the {MERGES_FILE} that open_clip ships: pip install 'clipforge[open_clip]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MERGES_FILE
    if not path.is_file():
        raise CheckpointError(f"the installed open_clip has no {MERGES_FILE}; reinstall open_clip_torch")
    return path


def write_clip_bpe_files(folder: Path, merges_file: Path | None = None) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``folder`` (module docstring); returns both paths."""
    lines = gzip.decompress((merges_file or open_clip_merges_file()).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocabulary = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(pair) for pair in merges), START, END]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def clip_bpe_tokenizer(padding: str = "longest", merges_file: Path | None = None, clean: str = "lower") -> HFTokenizer:
    """CLIP's tokenizer as open_clip's ``SimpleTokenizer`` applies it (transformers' ``CLIPTokenizer`` over
    :func:`write_clip_bpe_files`'s vocabulary): captions cleaned by ``clean`` (open_clip's default ``lower``:
    ``clipforge.data.text_clean``), ``<|startoftext|> text <|endoftext|>``, padded with id 0 as open_clip pads."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder, quiet_transformers():
        write_clip_bpe_files(Path(folder), merges_file)
        return HFTokenizer(CLIPTokenizer.from_pretrained(folder), padding, clean=clean, pad_id=0)
