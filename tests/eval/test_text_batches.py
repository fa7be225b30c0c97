"""encode_text_batches: texts batched by token count, rows returned in the order given."""

from __future__ import annotations

from pathlib import Path

import torch

from clipforge.data.tokenize import load_hf_tokenizer, train_bpe_tokenizer
from clipforge.eval.features import encode_text_batches
from clipforge.model.text import HFTextEncoder
from tests.conftest import processor_for, write_tiny_bert

# lengths deliberately out of order, with ties, so that both the sort and its undoing are exercised
TEXTS = [
    "a large red circle , a small blue square , a large green triangle",
    "a red circle",
    "a small blue square , a large green triangle",
    "red",
    "a large green triangle",
    "blue",
    "a small red circle , a small red circle",
]


class RecordingSum(torch.nn.Module):
    """A row's features: (sum of its ids, its token count); records every batch's (rows, padded length)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(input_ids.shape))
        return torch.stack([(input_ids * attention_mask).sum(1), attention_mask.sum(1)], dim=1).float()


def test_rows_come_back_in_order_and_batches_pad_to_their_own_longest() -> None:
    tokenizer = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    encode = RecordingSum()
    rows = encode_text_batches(encode, processor_for(tokenizer, 32), TEXTS, batch_size=3)
    # the independent reference: each text alone
    alone = torch.cat([RecordingSum()(*tokenizer([text], 32)) for text in TEXTS])
    assert torch.equal(rows, alone)
    counts = sorted(int(c) for c in alone[:, 1])
    # batches in token-count order, each padded to its own longest: 3 + 3 + 1 rows
    assert encode.shapes == [(3, counts[2]), (3, counts[5]), (1, counts[6])]
    # against caption order, strictly fewer padded tokens (the point of sorting)
    in_order = sum(
        len(chunk) * max(len(tokenizer([t], 32)[1][0]) for t in chunk) for chunk in (TEXTS[:3], TEXTS[3:6], TEXTS[6:])
    )
    assert sum(rows * width for rows, width in encode.shapes) < in_order


def test_max_length_padding_is_kept() -> None:
    tokenizer = train_bpe_tokenizer(TEXTS * 4, vocab_size=300, padding="max_length")
    encode = RecordingSum()
    encode_text_batches(encode, processor_for(tokenizer, 24), TEXTS, batch_size=4)
    assert encode.shapes == [(4, 24), (3, 24)]


def test_a_real_text_tower_gives_each_text_its_own_embedding(tmp_path: Path) -> None:
    """A BERT with masked padding: batched by length or one text at a time, the same rows (float rounding)."""
    folder = write_tiny_bert(tmp_path / "bert")
    tokenizer = load_hf_tokenizer(str(folder))
    tower = HFTextEncoder(str(folder), pretrained=True, pooling="mean").eval()
    with torch.inference_mode():
        rows = encode_text_batches(tower, processor_for(tokenizer, 32), TEXTS, batch_size=3)
        alone = torch.cat([tower(*tokenizer([text], 32)) for text in TEXTS])
    torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)


def test_no_texts() -> None:
    assert encode_text_batches(RecordingSum(), processor_for(train_bpe_tokenizer(TEXTS, 300), 32), [], 4).numel() == 0


def test_windows_of_texts_are_sorted_apart_and_come_back_in_order(monkeypatch) -> None:
    """Texts beyond one window (SORT_WINDOW) are tokenized and sorted window by window; the rows still
    follow the input order, each equal to the text encoded alone."""
    import clipforge.eval.features as features_module

    monkeypatch.setattr(features_module, "SORT_WINDOW", 3)
    tokenizer = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    encode = RecordingSum()
    rows = encode_text_batches(encode, processor_for(tokenizer, 32), TEXTS, batch_size=2)
    alone = torch.cat([RecordingSum()(*tokenizer([text], 32)) for text in TEXTS])
    assert torch.equal(rows, alone)
    assert [batch_rows for batch_rows, _ in encode.shapes] == [2, 1, 2, 1, 1]  # windows of 3, 3, 1
