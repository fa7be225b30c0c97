"""Text towers: the built-in causal transformer and Hugging Face encoders built from tiny local configs."""

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from clipforge.config import TextTowerConfig
from clipforge.model.text import (
    HFTextEncoder,
    TextTransformer,
    build_hf_tower,
    build_transformer_tower,
    pool_tokens,
    resolve_pooling,
)

VOCAB = 50


def tiny_text_tower(pooling: str = "eot") -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(VOCAB, context_length=12, width=32, depth=2, heads=4, mlp_ratio=2.0, pooling=pooling).eval()


def padded(real_ids: list[int], length: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((1, length), pad_id, dtype=torch.long)
    ids[0, : len(real_ids)] = torch.tensor(real_ids)
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, : len(real_ids)] = 1
    return ids, mask


# ---------------------------------------------------------------- pooling
def test_pool_tokens_against_plain_loops():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    eot = pool_tokens(hidden, mask, "eot")
    mean = pool_tokens(hidden, mask, "mean")
    for row in range(3):
        real = int(mask[row].sum())
        torch.testing.assert_close(eot[row], hidden[row, real - 1])
        torch.testing.assert_close(mean[row], hidden[row, :real].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="unknown"):
        pool_tokens(hidden, mask, "max")


def test_auto_pooling_depends_on_kind():
    assert resolve_pooling(TextTowerConfig(kind="transformer")) == "eot"
    assert resolve_pooling(TextTowerConfig(kind="hf", name="x")) == "cls"
    assert resolve_pooling(TextTowerConfig(kind="hf", name="x", pooling="mean")) == "mean"


# ---------------------------------------------------------------- built-in transformer
@pytest.mark.parametrize("pooling", ["eot", "mean", "cls"])
def test_text_transformer_shape(pooling):
    tower = tiny_text_tower(pooling)
    ids = torch.randint(1, VOCAB, (3, 10))
    assert tower.output_dim == 32
    assert tower(ids, torch.ones_like(ids)).shape == (3, 32)


@pytest.mark.parametrize("pooling", ["eot", "mean"])
def test_padding_changes_nothing_and_matches_unpadded_input(pooling):
    tower = tiny_text_tower(pooling)
    real = [5, 17, 3, 42]
    ids, mask = padded(real, length=10)
    features = tower(ids, mask)
    # other ids in the padding positions: same features
    noisy_ids = ids.clone()
    noisy_ids[0, len(real) :] = torch.tensor([7, 8, 9, 10, 11, 12])
    torch.testing.assert_close(tower(noisy_ids, mask), features, atol=1e-6, rtol=0)
    # the same text with no padding at all: same features
    unpadded = torch.tensor([real])
    torch.testing.assert_close(tower(unpadded, torch.ones_like(unpadded)), features, atol=1e-5, rtol=1e-5)


def test_eot_pooling_reads_the_last_real_token():
    tower = tiny_text_tower("eot")
    ids, mask = padded([5, 17, 3, 42], length=10)
    changed_last = ids.clone()
    changed_last[0, 3] = 9
    assert (tower(ids, mask) - tower(changed_last, mask)).abs().amax() > 1e-3


def test_text_transformer_attention_is_causal():
    tower = tiny_text_tower()
    ids = torch.randint(1, VOCAB, (1, 8))
    _, attentions = tower(ids, torch.ones_like(ids), return_attention=True)
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert len(attentions) == 2 and all(torch.all(weights[..., upper] == 0) for weights in attentions)


def test_text_longer_than_context_is_rejected():
    tower = tiny_text_tower()
    ids = torch.ones(1, 13, dtype=torch.long)
    with pytest.raises(ValueError, match=r"13 tokens.*context_length is 12"):
        tower(ids, torch.ones_like(ids))


def test_mask_shape_must_match_ids():
    tower = tiny_text_tower()
    with pytest.raises(ValueError, match="attention_mask shape"):
        tower(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_builtin_tower_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        build_transformer_tower(TextTowerConfig(), vocab_size=None)
    tower = build_transformer_tower(TextTowerConfig(width=32, depth=1, heads=2), vocab_size=VOCAB, pad_token_id=3)
    assert tower.token_embedding.num_embeddings == VOCAB and tower.pad_token_id == 3


# ---------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random BERT and DistilBERT saved as local folders (weights + config): no hub access."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    bert = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    distil = DistilBertModel(
        DistilBertConfig(vocab_size=VOCAB, dim=24, n_layers=1, n_heads=2, hidden_dim=48, max_position_embeddings=32)
    )
    bert.save_pretrained(root / "bert")
    distil.save_pretrained(root / "distilbert")
    return {"bert": (root / "bert", bert), "distilbert": (root / "distilbert", distil)}


@pytest.mark.parametrize(("family", "hidden"), [("bert", 32), ("distilbert", 24)])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_shapes(hf_folders, family, hidden, pooling):
    folder, _ = hf_folders[family]
    tower = HFTextEncoder(str(folder), pretrained=None, pooling=pooling).eval()
    ids = torch.randint(1, VOCAB, (3, 9))
    assert tower.output_dim == hidden
    assert tower(ids, torch.ones_like(ids)).shape == (3, hidden)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_hf_mean_pooling_ignores_padding(hf_folders, family):
    folder, _ = hf_folders[family]
    tower = HFTextEncoder(str(folder), pretrained="default", pooling="mean").eval()
    real = [2, 11, 29, 4, 3]
    short_ids, short_mask = padded(real, length=6)
    long_ids, long_mask = padded(real, length=20)
    long_ids[0, len(real) :] = 13  # padding ids must not matter either
    with torch.no_grad():
        torch.testing.assert_close(tower(long_ids, long_mask), tower(short_ids, short_mask), atol=1e-5, rtol=0)


def test_hf_pretrained_loads_saved_weights_and_none_is_random(hf_folders):
    folder, source = hf_folders["bert"]
    loaded = HFTextEncoder(str(folder), pretrained="default")
    by_path = HFTextEncoder("ignored-name", pretrained=str(folder))
    random = HFTextEncoder(str(folder), pretrained=None)
    reference = source.embeddings.word_embeddings.weight
    torch.testing.assert_close(loaded.encoder.embeddings.word_embeddings.weight, reference)
    torch.testing.assert_close(by_path.encoder.embeddings.word_embeddings.weight, reference)
    assert not torch.equal(random.encoder.embeddings.word_embeddings.weight, reference)
    assert loaded.encoder.pooler is None  # unused by clipforge's pooling, so dropped


def test_hf_builder_checks_vocab_and_context(hf_folders):
    folder, _ = hf_folders["bert"]
    cfg = TextTowerConfig(kind="hf", name=str(folder), context_length=16)
    assert build_hf_tower(cfg, vocab_size=VOCAB).pooling == "cls"
    with pytest.raises(ValueError, match=f"{VOCAB + 1} tokens"):
        build_hf_tower(cfg, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="context_length=64 exceeds the 32 positions"):
        build_hf_tower(TextTowerConfig(kind="hf", name=str(folder), context_length=64))
