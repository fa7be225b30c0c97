"""Captions to token ids: one ``Tokenizer`` interface for the collate function and the model.

Two kinds, both saved inside every checkpoint as plain strings (``state_dict``), so a checkpoint needs
neither the network nor the original files to tokenize exactly as in training:

- ``bpe``: a byte-level BPE (the ``tokenizers`` library) trained on the run's *training* captions.
  Byte-level means every string maps to tokens: there is no unknown token. Sequences are
  ``<bos> text <eos>``, padded with ``<pad>`` (id 0).
- ``hf``: any Hugging Face tokenizer (``transformers.AutoTokenizer``), e.g. the one that belongs to a
  pretrained text tower; sequences are whatever it builds (``[CLS] text [SEP]`` for BERT).

A batch is padded on the right to its longest sequence (never beyond ``context_length``), or with
``padding="max_length"`` every sequence to ``context_length`` (SigLIP's text tower reads its padding), with an
attention mask that is 1 on real tokens; truncation always keeps the end-of-text token last, so
end-of-text pooling finds it in every row.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from clipforge.config import TokenizerConfig
from clipforge.data.base import bounded_text
from clipforge.data.hf_loading import hf_from_pretrained, quiet_transformers
from clipforge.data.text_clean import text_cleaner
from clipforge.packaged import hf_load_kwargs

__all__ = [
    "Tokenizer",
    "BpeTokenizer",
    "HFTokenizer",
    "train_bpe_tokenizer",
    "load_hf_tokenizer",
    "build_tokenizer",
]

Loaded = TypeVar("Loaded")

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PADDINGS = ("longest", "max_length")
# the state-dict key of the padding rule; absent = "longest" (so states written before it load unchanged)
PADDING_KEY = "padding"
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte value
# A merge must be seen in at least two captions' worth of text: a pair that occurs once is a quirk of one
# caption, and spending vocabulary on it only helps memorize that caption.
MIN_FREQUENCY = 2


def _check_batch(texts: Sequence[str], context_length: int, min_length: int) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of captions, not one string; wrap it: tokenizer([text], ...)")
    texts = [bounded_text(text) for text in texts]
    if not texts:
        raise ValueError("texts is empty: a batch needs at least one caption")
    if context_length < min_length:
        raise ValueError(
            f"context_length={context_length} leaves no room for text: it must be at least {min_length} "
            f"(the special tokens plus one text token)"
        )
    return texts


class Tokenizer:
    """Batch of captions -> ``(input_ids, attention_mask)``; rebuilt exactly from ``state_dict()``.

    Picklable (through its state dict), so DataLoader workers started with ``spawn`` get an identical copy.
    Subclasses: :class:`BpeTokenizer`, :class:`HFTokenizer`.
    """

    kind: str = ""
    vocab_size: int
    pad_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    padding: str = "longest"

    def __call__(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, each int64 ``(B, L)`` with ``L = min(longest in batch, context_length)``
        (``L = context_length`` when :attr:`padding` is ``max_length``).

        Padded on the right with ``pad_token_id``; the mask is 1 on real tokens (special tokens included)
        and 0 on padding. A caption longer than ``context_length`` loses its last text tokens, never its
        end-of-text token (``<eos>`` / ``[SEP]``), which stays the last real token.
        """
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens and padding dropped (for inspection and tests)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, str]:
        """Plain ``str -> str`` (loads with ``torch.load(weights_only=True)``), enough to rebuild exactly."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path, model_max_length: int | None = None) -> None:
        """Write the tokenizer as transformers reads it back (``AutoTokenizer.from_pretrained(folder)``), giving
        the same ids; ``model_max_length``: the longest input it declares (a BPE tokenizer's context length)."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: dict[str, str]) -> Tokenizer:
        """The tokenizer that ``state_dict()`` described, of whichever kind it names."""
        kind = state.get("kind")
        if kind == "bpe":
            return BpeTokenizer._from_state(state)
        if kind == "hf":
            return HFTokenizer._from_state(state)
        raise ValueError(f"tokenizer state has kind={kind!r}; expected 'bpe' or 'hf' (is this a tokenizer state?)")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle through the checkpoint format: one serialization path, and no reliance on whether the
        # backing library objects pickle.
        return (Tokenizer.from_state_dict, (self.state_dict(),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_token_id={self.pad_token_id})"

    def _padding_state(self) -> dict[str, str]:
        return {} if self.padding == "longest" else {PADDING_KEY: self.padding}


def _check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"tokenizer padding={padding!r} is unknown; choose one of {list(PADDINGS)}")
    return padding


# ----------------------------------------------------------------------------------------------
# Byte-level BPE trained on the run's captions
# ----------------------------------------------------------------------------------------------
class BpeTokenizer(Tokenizer):
    """A byte-level BPE from the ``tokenizers`` library: ``<bos> text <eos>``, padding ``<pad>`` = 0."""

    kind = "bpe"

    def __init__(self, backend: Any, padding: str = "longest"):  # a tokenizers.Tokenizer
        self.padding = _check_padding(padding)
        for token in (PAD, BOS, EOS):
            if backend.token_to_id(token) is None:
                raise ValueError(
                    f"a BPE tokenizer needs the special token {token!r}; build it with train_bpe_tokenizer"
                )
        if hasattr(backend, "encode_special_tokens"):  # tokenizers >= 0.19; not saved in the JSON, so set here
            # A caption that literally says "<eos>" is text: only the post-processor places special tokens.
            backend.encode_special_tokens = True
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.pad_token_id = backend.token_to_id(PAD)
        self.bos_token_id = backend.token_to_id(BOS)
        self.eos_token_id = backend.token_to_id(EOS)

    def __call__(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        texts = _check_batch(texts, context_length, min_length=3)
        # The post-processor already wrapped each caption in <bos> ... <eos>.
        sequences = [encoding.ids for encoding in self._backend.encode_batch(texts)]
        longest = context_length if self.padding == "max_length" else max(len(ids) for ids in sequences)
        length = min(longest, context_length)
        input_ids = np.full((len(sequences), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, ids in enumerate(sequences):
            if len(ids) > length:
                ids = ids[: length - 1] + [self.eos_token_id]  # drop text, keep <eos> last
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def state_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "tokenizer.json": self._backend.to_str(), **self._padding_state()}

    @classmethod
    def _from_state(cls, state: dict[str, str]) -> BpeTokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(state["tokenizer.json"]), state.get(PADDING_KEY, "longest"))

    def save_pretrained(self, folder: str | Path, model_max_length: int | None = None) -> None:
        # transformers applies the same normalizer, pre-tokenizer and <bos> ... <eos> template; it matches the
        # special tokens inside a caption's text, which this tokenizer reads as text (captions rarely hold them)
        from transformers import PreTrainedTokenizerFast

        options = {} if model_max_length is None else {"model_max_length": model_max_length}
        wrapper = PreTrainedTokenizerFast(
            tokenizer_object=self._backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, **options
        )
        wrapper.save_pretrained(str(folder))

    def with_swapped_ids(self, first: int, second: int) -> BpeTokenizer:
        """The same tokenizer with ids ``first`` and ``second`` exchanged everywhere (vocabulary, special tokens,
        the ``<bos> text <eos>`` template): token t gets id ``first`` where it had ``second`` and back."""
        from tokenizers import Tokenizer as Backend

        def swap(token_id: int) -> int:
            return {first: second, second: first}.get(token_id, token_id)

        layout = json.loads(self._backend.to_str())
        vocabulary = layout["model"]["vocab"]
        layout["model"]["vocab"] = {token: swap(token_id) for token, token_id in vocabulary.items()}
        for added in layout["added_tokens"]:
            added["id"] = swap(added["id"])
        for special in (layout.get("post_processor") or {}).get("special_tokens", {}).values():
            special["ids"] = [swap(token_id) for token_id in special["ids"]]
        return BpeTokenizer(Backend.from_str(json.dumps(layout)), self.padding)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, lowercase: bool = True, padding: str = "longest"
) -> BpeTokenizer:
    """Train a byte-level BPE on ``texts``, which must be the *training* captions only.

    Held-out (validation/test) captions must never shape the vocabulary: merges learned from them would
    leak their wording into the model. Pipeline: NFKC (+ lowercase) -> byte-level pre-tokenization (a space
    is prepended, so a word is one token at the start of a caption and in its middle) -> BPE merges up to
    ``vocab_size`` tokens (fewer if the captions run out of pairs seen ``MIN_FREQUENCY`` times) -> ``<bos> text
    <eos>``. Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; the 256 byte tokens follow, so any string,
    even in an unseen script, encodes without an unknown token. Training twice on the same captions gives
    the same vocabulary. ``padding``: see :attr:`Tokenizer.padding`.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    minimum = BYTE_ALPHABET_SIZE + 3
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            f"({BYTE_ALPHABET_SIZE} byte tokens + 3 special tokens)"
        )

    backend = Backend(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # Decoding strips the space that pre-tokenization prepended.
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[PAD, BOS, EOS],  # in this order: ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal count
        for text in items:
            count += 1
            yield bounded_text(text)

    backend.train_from_iterator(counted(texts), trainer=trainer)
    if count == 0:
        raise ValueError("train_bpe_tokenizer got no texts: pass the training captions")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))],
    )
    return BpeTokenizer(backend, padding)


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# ----------------------------------------------------------------------------------------------
_BINARY_PREFIX = "base64:"  # state key prefix for a saved file that is not UTF-8 text (e.g. spiece.model)


# state keys of the source framework's rules around a Hugging Face tokenizer (absent = not used, as in older states)
CLEAN_KEY, STRIP_SEP_KEY, PAD_ID_KEY = "clean", "strip_sep_token", "pad_id"


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer; padding and truncation are its own (``[CLS] text [SEP]`` for BERT).

    Three rules a source framework puts around the tokenizer (open_clip's; all off by default):
    ``clean``: a clean-up applied to every caption first (``clipforge.data.text_clean``: ``whitespace``, ``lower``,
    ``canonicalize``); ``strip_sep_token``: every separator id (BERT's ``[SEP]``) replaced by id 0 and masked out;
    ``pad_id``: padding written with this id instead of the tokenizer's pad token (open_clip pads CLIP's BPE with 0).
    """

    kind = "hf"

    def __init__(
        self,
        backend: Any,  # a transformers PreTrainedTokenizerBase
        padding: str = "longest",
        clean: str = "",
        strip_sep_token: bool = False,
        pad_id: int | None = None,
    ):
        self.padding = _check_padding(padding)
        self.clean = clean
        self._clean = text_cleaner(clean) if clean else None
        self.strip_sep_token = strip_sep_token
        if strip_sep_token and backend.sep_token_id is None:
            raise ValueError(f"strip_sep_token: {backend.name_or_path!r} has no separator token")
        if backend.pad_token is None:
            if backend.eos_token is None:
                raise ValueError(f"{backend.name_or_path!r} has neither a pad nor an end-of-text token to pad with")
            # GPT-style tokenizers have no pad token; the attention mask, not the id, marks padding.
            backend.pad_token = backend.eos_token
        backend.padding_side = "right"
        backend.truncation_side = "right"
        self._backend = backend
        self.vocab_size = len(backend)  # includes added tokens, unlike backend.vocab_size
        self.pad_token_id = backend.pad_token_id if pad_id is None else pad_id
        self.pad_id = pad_id
        self.bos_token_id = backend.bos_token_id
        self.eos_token_id = backend.eos_token_id

    def __call__(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        texts = _check_batch(texts, context_length, min_length=self._backend.num_special_tokens_to_add() + 1)
        if self._clean is not None:
            texts = [self._clean(text) for text in texts]
        encoded = self._backend(
            texts,
            padding=self.padding,
            truncation=True,  # counts the special tokens, so [SEP] survives
            max_length=context_length,
            return_tensors="pt",
            return_token_type_ids=False,
            return_attention_mask=True,  # SigLIP's released tokenizers do not return it unasked (model_input_names)
        )
        input_ids, attention_mask = encoded["input_ids"].long(), encoded["attention_mask"].long()
        if self.strip_sep_token:
            separators = input_ids == self._backend.sep_token_id
            input_ids, attention_mask = input_ids.masked_fill(separators, 0), attention_mask.masked_fill(separators, 0)
        if self.pad_id is not None:
            input_ids = input_ids.masked_fill(attention_mask == 0, self.pad_id)
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def state_dict(self) -> dict[str, str]:
        state = {"kind": self.kind, **self._padding_state(), **self._rules_state()}
        with tempfile.TemporaryDirectory() as folder:
            self._backend.save_pretrained(folder)
            for path in sorted(Path(folder).rglob("*")):
                if not path.is_file():
                    continue
                name = path.relative_to(folder).as_posix()
                data = path.read_bytes()
                try:
                    state[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    state[_BINARY_PREFIX + name] = base64.b64encode(data).decode("ascii")
        return state

    def _rules_state(self) -> dict[str, str]:
        rules = {CLEAN_KEY: self.clean} if self.clean else {}
        if self.strip_sep_token:
            rules[STRIP_SEP_KEY] = "true"
        if self.pad_id is not None:
            rules[PAD_ID_KEY] = str(self.pad_id)
        return rules

    def save_pretrained(self, folder: str | Path, model_max_length: int | None = None) -> None:
        self._backend.save_pretrained(str(folder))  # its own files: they already say how long an input may be

    @classmethod
    def _from_state(cls, state: dict[str, str]) -> HFTokenizer:
        with tempfile.TemporaryDirectory() as folder:
            for key, content in state.items():
                if key in ("kind", PADDING_KEY, CLEAN_KEY, STRIP_SEP_KEY, PAD_ID_KEY):
                    continue
                binary = key.startswith(_BINARY_PREFIX)
                name = key[len(_BINARY_PREFIX) :] if binary else key
                relative = PurePosixPath(name)
                # The state comes from a checkpoint file: never let it write outside the folder.
                if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    raise ValueError(f"tokenizer state holds an unsafe file name {name!r}")
                target = Path(folder, *relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                if binary:
                    target.write_bytes(base64.b64decode(content))
                else:
                    target.write_text(content, encoding="utf-8")
            pad_id = state.get(PAD_ID_KEY)
            return cls(
                _auto_tokenizer(folder),
                state.get(PADDING_KEY, "longest"),
                clean=state.get(CLEAN_KEY, ""),
                strip_sep_token=state.get(STRIP_SEP_KEY) == "true",
                pad_id=None if pad_id is None else int(pad_id),
            )


def _auto_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(name_or_path, **hf_load_kwargs(name_or_path))


# any of these makes a folder a saved tokenizer (AutoTokenizer builds an empty one from a bare config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def load_hf_tokenizer(
    name_or_path: str, field: str = "model.text.tokenizer.name", padding: str = "longest", **rules: Any
) -> HFTokenizer:
    """A Hugging Face tokenizer by hub id, local folder or ``package:<name>`` (a model folder shipped in a pip
    package, see :mod:`clipforge.packaged`), through ``AutoTokenizer.from_pretrained``.

    ``field``: the config field ``name_or_path`` came from, for the ConfigError a wrong name raises.
    ``padding``: see :attr:`Tokenizer.padding`; ``rules``: :class:`HFTokenizer`'s ``clean`` / ``strip_sep_token`` /
    ``pad_id``.
    """
    from transformers import AutoTokenizer

    backend = hf_from_pretrained(AutoTokenizer.from_pretrained, name_or_path, field, TOKENIZER_FILES)
    return HFTokenizer(backend, padding, **rules)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
def build_tokenizer(config: TokenizerConfig, text_tower_name: str, training_texts: Sequence[str] | None) -> Tokenizer:
    """The tokenizer ``config`` describes.

    ``bpe``: trained on ``training_texts`` (the training split's captions; required).
    ``hf``: loaded from ``config.name``, or from ``text_tower_name`` (the text tower's ``name``) when empty.
    """
    if config.kind == "bpe":
        if training_texts is None:
            raise ValueError("tokenizer.kind='bpe' is trained on the training captions: pass training_texts")
        return train_bpe_tokenizer(training_texts, config.vocab_size, config.lowercase, config.padding)
    if config.kind == "hf":
        name = config.name or text_tower_name
        if not name:
            raise ValueError(
                "tokenizer.kind='hf' needs model.text.tokenizer.name or model.text.name: a Hugging Face id or folder"
            )
        field = "model.text.tokenizer.name" if config.name else "model.text.name"
        return load_hf_tokenizer(name, field, config.padding)
    raise ValueError(f"tokenizer.kind={config.kind!r} is not a tokenizer; choose 'bpe' or 'hf'")
