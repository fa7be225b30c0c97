"""ClipLoss / SigLipLoss against references written plainly here: NumPy loops for values, the textbook
torch formulas (F.cross_entropy, F.logsigmoid with a full label matrix) in float64 for gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from clipforge import losses
from clipforge.config import LossConfig
from clipforge.losses import LOSSES, ClipLoss, ContrastiveLoss, SigLipLoss, build_loss

N, D = 10, 6  # N = 10 so that chunk sizes 3 and 7 do not divide it
CHUNK_SIZES = [None, 1, 3, 7, 10, 64]


def make_inputs(n: int = N, d: int = D, seed: int = 0, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    # texts correlated with their images, so the positives differ from the negatives
    texts = F.normalize(images + 0.7 * torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    logit_scale = torch.tensor(7.0, dtype=torch.float64)  # the multiplier t, as the losses take it
    logit_bias = torch.tensor(-2.5, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (images, texts, logit_scale, logit_bias)]


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------
def numpy_clip_loss(images: np.ndarray, texts: np.ndarray, logit_scale: float) -> float:
    n = images.shape[0]
    t = logit_scale
    logits = [[t * float(np.dot(images[i], texts[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(row: list[float], target: int) -> float:
        top = max(row)
        return top + math.log(sum(math.exp(v - top) for v in row)) - row[target]

    rows = sum(cross_entropy(logits[i], i) for i in range(n)) / n
    cols = sum(cross_entropy([logits[i][j] for i in range(n)], j) for j in range(n)) / n
    return 0.5 * (rows + cols)


def numpy_siglip_loss(images: np.ndarray, texts: np.ndarray, logit_scale: float, logit_bias: float) -> float:
    n = images.shape[0]
    t = logit_scale
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            u = z * (t * float(np.dot(images[i], texts[j])) + logit_bias)
            # -log sigmoid(u) = log(1 + exp(-u)), written to not overflow for either sign of u
            total += math.log1p(math.exp(-u)) if u >= 0 else -u + math.log1p(math.exp(u))
    return total / n


def torch_clip_reference(images, texts, logit_scale):
    logits = logit_scale * images @ texts.T
    labels = torch.arange(images.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def torch_siglip_reference(images, texts, logit_scale, logit_bias):
    logits = logit_scale * images @ texts.T + logit_bias
    labels = 2 * torch.eye(images.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / images.shape[0]


def run_loss(kind: str, chunk_size: int | None, images, texts, logit_scale, logit_bias):
    if kind == "clip":
        return ClipLoss(chunk_size)(images, texts, logit_scale)
    return SigLipLoss(chunk_size)(images, texts, logit_scale, logit_bias)


def loss_and_grads(kind: str, chunk_size: int | None, inputs):
    loss = run_loss(kind, chunk_size, *inputs)
    wrt = inputs if kind == "siglip" else inputs[:3]
    return loss, torch.autograd.grad(loss, wrt)


# ----------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_clip_value_matches_numpy_loops(chunk_size):
    images, texts, logit_scale, _ = make_inputs()
    expected = numpy_clip_loss(images.detach().numpy(), texts.detach().numpy(), logit_scale.item())
    loss = ClipLoss(chunk_size)(images, texts, logit_scale)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_siglip_value_matches_numpy_loops(chunk_size):
    images, texts, logit_scale, logit_bias = make_inputs()
    expected = numpy_siglip_loss(images.detach().numpy(), texts.detach().numpy(), logit_scale.item(), logit_bias.item())
    loss = SigLipLoss(chunk_size)(images, texts, logit_scale, logit_bias)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_open_clips_call_gives_open_clips_loss(kind):
    """The call shape is open_clip's, multiplier included (there ``logit_scale = model.logit_scale.exp()``): the
    same arguments give the same loss, so a call ported either way takes ``exp`` neither twice nor not at all."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    images, texts, logit_scale, logit_bias = (t.detach() for t in make_inputs())
    arguments = (images, texts, logit_scale) + ((logit_bias,) if kind == "siglip" else ())
    theirs = (open_clip_loss.ClipLoss() if kind == "clip" else open_clip_loss.SigLipLoss())(*arguments)
    for chunk_size in (None, 3):
        assert LOSSES[kind](chunk_size)(*arguments).item() == pytest.approx(theirs.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradients_match_textbook_formula(kind, chunk_size):
    inputs = make_inputs(n=16, d=8, seed=1, dtype=torch.float64)
    reference_fn = torch_clip_reference if kind == "clip" else torch_siglip_reference
    reference_inputs = inputs if kind == "siglip" else inputs[:3]
    reference = reference_fn(*reference_inputs)  # float64 throughout
    expected_grads = torch.autograd.grad(reference, reference_inputs)

    loss, grads = loss_and_grads(kind, chunk_size, inputs)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert got.dtype == torch.float64  # gradients come back in the inputs' dtype
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
    """A second, formula-free check of d loss / d logit_scale and d loss / d logit_bias.

    The loss is evaluated in float32 (by design), so the step is large enough that float32 rounding
    (~1e-7 relative) stays far below the difference it measures."""
    images, texts, logit_scale, logit_bias = make_inputs(dtype=torch.float64)
    step = 1e-2
    for kind in ("clip", "siglip"):
        _, grads = loss_and_grads(kind, 4, [images, texts, logit_scale, logit_bias])
        for index, param in ((2, logit_scale), (3, logit_bias))[: 2 if kind == "siglip" else 1]:
            with torch.no_grad():
                shifted = [images, texts, logit_scale, logit_bias]
                shifted[index] = param + step
                up = run_loss(kind, None, *shifted).double()
                shifted[index] = param - step
                down = run_loss(kind, None, *shifted).double()
            assert grads[index].item() == pytest.approx(((up - down) / (2 * step)).item(), rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 64])
def test_chunked_equals_unchunked(kind, chunk_size):
    inputs = make_inputs(n=N, d=D, seed=2)
    full_loss, full_grads = loss_and_grads(kind, None, inputs)
    chunked_loss, chunked_grads = loss_and_grads(kind, chunk_size, inputs)
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-6, atol=1e-6)
    for chunked, full in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Dtypes, shapes, sanity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_result_is_float32_scalar(kind, dtype, chunk_size):
    inputs = make_inputs(dtype=dtype)
    loss = run_loss(kind, chunk_size, *inputs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert inputs[0].grad.dtype == dtype and torch.isfinite(inputs[0].grad.float()).all()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_low_precision_inputs_give_float32_maths(kind):
    """bf16 features are upcast, not computed in bf16: the loss equals the float32 loss of the same values."""
    inputs = make_inputs(dtype=torch.bfloat16)
    as_float32 = [t.detach().float() for t in inputs]
    expected = run_loss(kind, None, *as_float32)
    torch.testing.assert_close(run_loss(kind, None, *inputs), expected, rtol=1e-6, atol=1e-6)
    # autocast around the call must not push the matmuls back to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(run_loss(kind, 3, *as_float32), expected, rtol=1e-6, atol=1e-6)


def test_perfect_alignment_with_large_scale_gives_near_zero_clip_loss():
    features = torch.eye(8)  # orthonormal: l_ii = t, l_ij = 0
    loss = ClipLoss()(features, features.clone(), torch.tensor(100.0))
    assert 0.0 <= loss.item() < 1e-30 + 7 * math.exp(-100) * 1.01
    assert ClipLoss(chunk_size=3)(features, features.clone(), torch.tensor(100.0)).item() < 1e-6


def test_shape_errors_are_clear():
    images, texts, logit_scale, logit_bias = make_inputs()
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(images, texts[:-1], logit_scale)
    with pytest.raises(ValueError, match="same shape"):
        SigLipLoss(chunk_size=2)(images, texts[:, :-1], logit_scale, logit_bias)
    with pytest.raises(ValueError, match=r"\(batch, embed_dim\)"):
        ClipLoss()(images[0], texts[0], logit_scale)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        ClipLoss()(images, texts, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        SigLipLoss()(images, texts, logit_scale, torch.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=0)


def test_build_loss_from_config():
    clip = build_loss(LossConfig(kind="clip", chunk_size=8))
    siglip = build_loss(LossConfig(kind="siglip"))
    assert isinstance(clip, ClipLoss) and clip.chunk_size == 8
    assert isinstance(siglip, SigLipLoss) and siglip.chunk_size is None
    with pytest.raises(ValueError, match="loss.kind"):
        build_loss(LossConfig(kind="triplet"))  # type: ignore[arg-type]


def test_both_losses_share_one_base_and_one_table():
    assert LOSSES == {"clip": ClipLoss, "siglip": SigLipLoss}
    for kind, loss_class in LOSSES.items():
        loss_fn = build_loss(LossConfig(kind=kind, chunk_size=4), distributed=True)
        assert type(loss_fn) is loss_class and isinstance(loss_fn, ContrastiveLoss)
        assert repr(loss_fn) == f"{loss_class.__name__}(chunk_size=4, distributed=True)"
    with pytest.raises(ValueError, match=r"loss.kind='triplet' is not a loss; choose one of \['clip', 'siglip'\]"):
        build_loss(LossConfig(kind="triplet"))  # type: ignore[arg-type]


def test_the_bias_is_refused_or_required_with_a_clear_message():
    images, texts, logit_scale, logit_bias = make_inputs()
    with pytest.raises(ValueError, match="the CLIP softmax loss has no logit bias; .* loss.kind=siglip"):
        ClipLoss()(images, texts, logit_scale, logit_bias)
    with pytest.raises(ValueError, match="the SigLIP sigmoid loss needs logit_bias"):
        SigLipLoss()(images, texts, logit_scale)


@pytest.mark.parametrize("loss_class", [ClipLoss, SigLipLoss])
def test_a_malformed_batch_fails_before_any_collective(loss_class, monkeypatch):
    # a rank that entered the gather/ring with a malformed batch would leave its peers waiting forever
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective ran before the features were checked")

    monkeypatch.setattr(losses, "is_distributed", lambda: True)
    monkeypatch.setattr(losses, "gather_ints", no_collective)
    images, texts, logit_scale, logit_bias = make_inputs()
    with pytest.raises(ValueError, match="same shape"):
        loss_class(distributed=True)(images, texts[:-1], logit_scale, logit_bias if loss_class.needs_bias else None)


# ----------------------------------------------------------------------------------------------
# Building blocks for distributed variants: rows against (gathered / exchanged) columns
# ----------------------------------------------------------------------------------------------
def test_clip_partial_sums_over_row_shards_add_up_to_the_loss():
    images, texts, logit_scale, _ = make_inputs(n=12)
    loss_fn = ClipLoss(chunk_size=5)
    shards = [slice(0, 5), slice(5, 12)]  # two "processes", unequal shards
    total = sum(loss_fn.partial_sum(images[s], texts[s], images, texts, logit_scale) for s in shards)
    torch.testing.assert_close(total / (2 * 12), ClipLoss()(images, texts, logit_scale))


def test_siglip_pair_sums_over_blocks_add_up_to_the_loss():
    images, texts, logit_scale, logit_bias = make_inputs(n=12)
    loss_fn = SigLipLoss(chunk_size=4)
    blocks = [slice(0, 6), slice(6, 12)]
    total = sum(
        loss_fn.pair_sum(images[a], texts[b], logit_scale, logit_bias, paired=a == b) for a in blocks for b in blocks
    )
    torch.testing.assert_close(total / 12, SigLipLoss()(images, texts, logit_scale, logit_bias))


# ----------------------------------------------------------------------------------------------
# Memory: chunking never builds nor keeps an N x N matrix
# ----------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def memory_profile(kind: str, chunk_size: int | None, n: int, d: int) -> dict[str, int]:
    """Elements that a loss forward + backward holds, measured two ways.

    ``largest_saved``: the largest tensor autograd saves for backward; ``total_saved``: all distinct
    storages it saves (a tensor saved by several ops counts once), i.e. what stays alive between forward
    and backward; ``largest_created``: the largest tensor any op produces, in forward or backward.
    """
    images, texts, logit_scale, logit_bias = make_inputs(n=n, d=d, seed=3, dtype=torch.float32)
    saved: dict[int, int] = {}  # storage address -> elements

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes() // tensor.element_size())
        return tensor

    with _LargestTensor() as created:
        with saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = run_loss(kind, chunk_size, images, texts, logit_scale, logit_bias)
        loss.backward()
    assert images.grad is not None and logit_scale.grad is not None
    return {
        "largest_saved": max(saved.values()),
        "total_saved": sum(saved.values()),
        "largest_created": created.largest,
    }


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunking_bounds_memory(kind):
    n, d, chunk_size = 256, 8, 32
    full = memory_profile(kind, None, n, d)
    assert full["largest_saved"] == n * n and full["largest_created"] == n * n  # the probes do see N x N

    chunked = memory_profile(kind, chunk_size, n, d)
    assert chunked["largest_saved"] < n * n
    # kept for backward: the features (and scalars), no block of logits; a quarter of N^2 is far above that
    assert chunked["total_saved"] < n * n // 4
    # one (chunk_size, N) block of logits exists at a time, in forward and in backward
    assert chunked["largest_created"] <= chunk_size * n


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_memory_probe_catches_blocks_kept_for_backward(kind, monkeypatch):
    """Without checkpointing, every block's logits stay alive until backward: N^2 in all. The probe sees it."""
    import clipforge.losses

    monkeypatch.setattr(clipforge.losses, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    n = 256
    assert memory_profile(kind, 32, n, 8)["total_saved"] >= n * n
