"""Tokenizers: batching contract (padding, mask, truncation), exact rebuild from state, pickling, HF path.

Nothing here touches the network: the BPE trains on captions written below, the Hugging Face tokenizer
is built from a tiny WordPiece vocabulary written into tmp_path.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import pytest
import torch

from clipforge.config import TokenizerConfig
from clipforge.data.tokenize import (
    BpeTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_hf_tokenizer,
    train_bpe_tokenizer,
)

CAPTIONS = [
    "A dog runs on the green grass.",
    "Two cats sleep on a red sofa.",
    "A small dog plays with a ball near the tree.",
    "A red car is parked on the street.",
    "Children play football on the grass.",
    "A cat watches the birds from the window.",
    "Two dogs run along the beach at sunset.",
    "A man rides a bicycle down the street.",
] * 3
VOCAB_SIZE = 320


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return train_bpe_tokenizer(CAPTIONS, VOCAB_SIZE)


def encode_one(tokenizer: Tokenizer, text: str) -> list[int]:
    ids, mask = tokenizer([text], context_length=1000)
    return ids[0][mask[0].bool()].tolist()


def state_round_trip(state: dict[str, str]) -> dict[str, str]:
    """Through the checkpoint path: torch.save, then torch.load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["tokenizer"]


# ----------------------------------------------------------------------------------------------
# Byte-level BPE
# ----------------------------------------------------------------------------------------------
def test_special_token_ids(bpe):
    assert bpe.pad_token_id == 0 and (bpe.bos_token_id, bpe.eos_token_id) == (1, 2)
    assert 256 + 3 <= bpe.vocab_size <= VOCAB_SIZE


def test_pads_to_the_longest_in_the_batch_with_a_correct_mask(bpe):
    texts = ["A dog.", "Two cats sleep on a red sofa near the window.", "grass"]
    lengths = [len(encode_one(bpe, text)) for text in texts]
    ids, mask = bpe(texts, context_length=64)
    assert ids.shape == mask.shape == (3, max(lengths)) and max(lengths) < 64
    assert ids.dtype == mask.dtype == torch.int64
    for row, length in enumerate(lengths):
        assert mask[row].tolist() == [1] * length + [0] * (max(lengths) - length)  # real tokens first, then padding
        assert (ids[row, length:] == bpe.pad_token_id).all()
        assert ids[row, 0] == bpe.bos_token_id and ids[row, length - 1] == bpe.eos_token_id
        assert ids[row, :length].tolist() == encode_one(bpe, texts[row])  # batching does not change the ids


def test_truncation_keeps_eos_last(bpe):
    long_text = " ".join(CAPTIONS[:4])
    full = encode_one(bpe, long_text)
    ids, mask = bpe([long_text, "A dog."], context_length=8)
    assert len(full) > 8 and ids.shape == (2, 8)
    assert ids[0].tolist() == full[:7] + [bpe.eos_token_id]  # text cut, <eos> kept
    assert mask[0].all() and mask[1].sum() < 8
    # end-of-text pooling (the last real token) finds <eos> in every row
    last_real = mask.sum(dim=1) - 1
    assert (ids[torch.arange(2), last_real] == bpe.eos_token_id).all()


def test_unseen_words_encode_without_unknown_tokens(bpe):
    text = "A zebra 🦓 eats Ωμέγα naïve ﬁsh"  # none of these words is in the training captions
    ids = encode_one(bpe, text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == "a zebra 🦓 eats ωμέγα naïve fish"  # NFKC splits the ligature, then lowercase
    assert len(encode_one(bpe, "zebra")) > 3  # held out of training: no merge covers it whole


def test_special_token_text_in_a_caption_is_plain_text(bpe):
    ids = encode_one(bpe, "a <eos> sign")
    assert ids.count(bpe.eos_token_id) == 1 and ids[-1] == bpe.eos_token_id


def test_lowercase_is_optional():
    cased = train_bpe_tokenizer(CAPTIONS, VOCAB_SIZE, lowercase=False)
    assert encode_one(cased, "Dog") != encode_one(cased, "dog")
    assert cased.decode(encode_one(cased, "A Dog")) == "A Dog"


def test_state_round_trip_gives_identical_ids(bpe):
    state = state_round_trip(bpe.state_dict())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in state.items())
    rebuilt = Tokenizer.from_state_dict(state)
    assert isinstance(rebuilt, BpeTokenizer) and rebuilt.vocab_size == bpe.vocab_size
    texts = CAPTIONS[:5] + ["An unseen xylophone 🦓 caption, longer than the context length allows for sure."]
    for context_length in (5, 77):
        for got, expected in zip(rebuilt(texts, context_length), bpe(texts, context_length), strict=True):
            assert torch.equal(got, expected)


def test_training_is_deterministic(bpe):
    assert train_bpe_tokenizer(CAPTIONS, VOCAB_SIZE).state_dict() == bpe.state_dict()
    # and in a fresh process, whose hash seeds differ
    script = (
        "import sys\n"
        "from clipforge.data.tokenize import train_bpe_tokenizer\n"
        f"sys.stdout.write(train_bpe_tokenizer({CAPTIONS!r}, {VOCAB_SIZE}).state_dict()['tokenizer.json'])\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output == bpe.state_dict()["tokenizer.json"]


def test_bad_arguments_are_explained(bpe):
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe_tokenizer(CAPTIONS, 100)
    with pytest.raises(ValueError, match="no texts"):
        train_bpe_tokenizer(iter([]), VOCAB_SIZE)
    with pytest.raises(TypeError, match="not one string"):
        bpe("a dog", context_length=8)
    with pytest.raises(ValueError, match="empty"):
        bpe([], context_length=8)
    with pytest.raises(ValueError, match="context_length=2"):
        bpe(["a dog"], context_length=2)
    with pytest.raises(ValueError, match="kind"):
        Tokenizer.from_state_dict({"tokenizer.json": "{}"})


# ----------------------------------------------------------------------------------------------
# Pickling (DataLoader workers started with spawn)
# ----------------------------------------------------------------------------------------------
class CollateCaptions:
    """A collate function like the loader's: module level, so spawned workers can unpickle it."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts, self.context_length)


def test_bpe_tokenizer_pickles(bpe):
    restored = pickle.loads(pickle.dumps(bpe))
    assert restored.state_dict() == bpe.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(restored(CAPTIONS, 12), bpe(CAPTIONS, 12), strict=True))


def test_bpe_tokenizer_works_in_spawned_loader_workers(bpe):
    loader = torch.utils.data.DataLoader(
        CAPTIONS[:8],
        batch_size=4,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=CollateCaptions(bpe, context_length=12),
    )
    batches = list(loader)
    for start, (ids, mask) in zip((0, 4), batches, strict=True):
        expected_ids, expected_mask = bpe(CAPTIONS[start : start + 4], 12)
        assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizer on a tiny local WordPiece vocabulary
# ----------------------------------------------------------------------------------------------
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "on", "the", "grass"]
WORDPIECE += ["red", "sofa", "two", "sleep", "##s", ".", "small", "ball"]


@pytest.fixture
def hf_folder(tmp_path):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    # from_pretrained on the folder reads vocab.txt in both transformers 4 and 5
    BertTokenizerFast.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def test_hf_tokenizer_pads_masks_and_truncates(hf_folder):
    tokenizer = load_hf_tokenizer(hf_folder)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == len(WORDPIECE) and tokenizer.pad_token_id == 0
    cls_id, sep_id = WORDPIECE.index("[CLS]"), WORDPIECE.index("[SEP]")

    ids, mask = tokenizer(["A dog runs on the grass.", "Two cats"], context_length=32)
    words = ["a", "dog", "runs", "on", "the", "grass", "."]
    assert ids[0].tolist() == [cls_id] + [WORDPIECE.index(w) for w in words] + [sep_id]
    assert ids[1].tolist() == [cls_id] + [WORDPIECE.index(w) for w in ("two", "cat", "##s")] + [sep_id] + [0] * 4
    assert mask.tolist() == [[1] * 9, [1] * 5 + [0] * 4]
    assert ids.dtype == mask.dtype == torch.int64

    ids, mask = tokenizer(["A dog runs on the grass.", "Two cats"], context_length=4)
    assert ids.shape == (2, 4) and ids[0, -1] == sep_id and ids[0, 0] == cls_id  # [SEP] survives truncation
    assert ids[1].tolist() == [cls_id, WORDPIECE.index("two"), WORDPIECE.index("cat"), sep_id]


def test_hf_state_round_trip_and_pickle(hf_folder):
    tokenizer = load_hf_tokenizer(hf_folder)
    state = state_round_trip(tokenizer.state_dict())
    assert state["kind"] == "hf" and "tokenizer.json" in state
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in state.items())
    texts = ["A small dog.", "Two red balls on the sofa near an unseen zebra."]
    for rebuilt in (Tokenizer.from_state_dict(state), pickle.loads(pickle.dumps(tokenizer))):
        assert isinstance(rebuilt, HFTokenizer) and rebuilt.vocab_size == tokenizer.vocab_size
        for got, expected in zip(rebuilt(texts, 6), tokenizer(texts, 6), strict=True):
            assert torch.equal(got, expected)


def test_hf_state_cannot_write_outside_its_folder(hf_folder):
    state = load_hf_tokenizer(hf_folder).state_dict()
    with pytest.raises(ValueError, match="unsafe"):
        Tokenizer.from_state_dict({**state, "../escape.json": "{}"})


# ----------------------------------------------------------------------------------------------
# build_tokenizer
# ----------------------------------------------------------------------------------------------
def test_build_tokenizer(hf_folder, bpe):
    built = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=VOCAB_SIZE), "", CAPTIONS)
    assert built.state_dict() == bpe.state_dict()
    with pytest.raises(ValueError, match="training_texts"):
        build_tokenizer(TokenizerConfig(kind="bpe"), "", None)

    from_name = build_tokenizer(TokenizerConfig(kind="hf", name=hf_folder), "ignored-tower-name", None)
    from_tower = build_tokenizer(TokenizerConfig(kind="hf"), hf_folder, None)
    assert from_name.state_dict() == from_tower.state_dict()
    with pytest.raises(ValueError, match="model.text.name"):
        build_tokenizer(TokenizerConfig(kind="hf"), "", None)
