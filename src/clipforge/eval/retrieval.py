"""Image-text retrieval metrics, computed block by block so the full score matrix is never built.

Conventions (the CLIP_benchmark naming):

- ``image_retrieval``: text -> image. Every caption is a query; the candidates are all images.
- ``text_retrieval``: image -> text. Every image is a query; the candidates are all captions.

Scores are dot products of the given features (cosine similarities when both sides are L2-normalized),
computed in float32 whatever the input dtype. Ranks are 1-based: rank 1 means the correct answer came first.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from clipforge.eval.classification import TieRule, check_tie_rule

__all__ = ["retrieval_metrics", "retrieval_ranks", "rank_to_recall", "rank_summary"]


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 4096,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Recall@k, mean rank and median rank in both retrieval directions.

    Let ``s(i, j) = <image_features[i], text_features[j]>`` and ``g(j) = text_to_image[j]``, the image that
    caption ``j`` describes (an image may have several captions; every image must have at least one).

    Text -> image (``image_retrieval_*``), one rank per caption ``j``::

        rank(j) = 1 + #{ i != g(j) : s(i, j) >= s(g(j), j) }

    Image -> text (``text_retrieval_*``), one rank per image ``i``, the rank of its best-ranked caption::

        best(i) = max_{j : g(j) = i} s(i, j)
        rank(i) = 1 + #{ j : g(j) != i and s(i, j) >= best(i) }

    so an image is a hit at k when any one of its captions is in the top k (the other correct captions never
    push it down).

    Tie rule (``ties``): ``pessimistic`` (the default, the formulas above) counts a wrong candidate that scores
    exactly the same as the correct one as ranked ahead of it, so a constant model (all scores equal) gets the
    worst possible rank, never a lucky one. ``index`` ranks tied candidates by index, the lower first (the order
    CLIP_benchmark's ``torch.topk`` is read in; PyTorch does not promise an order among equal values, see
    :mod:`clipforge.eval.classification`)::

        text -> image:  rank(j) = 1 + #{ i : s(i, j) > s(g(j), j) } + #{ i < g(j) : s(i, j) = s(g(j), j) }
        image -> text:  rank(i) = 1 + #{ wrong j : s(i, j) > best(i) } + #{ wrong j < first(i) : s(i, j) = best(i) }

    where ``first(i)`` is the lowest index of image i's captions that score ``best(i)``. Ties are rare with real
    features, but exact whenever two images share a caption (its embedding is computed once): then the rules
    differ, pessimistic counting every shared caption against both images.

    Returned keys, for each ``k`` in ``ks``: ``image_retrieval_recall@{k}`` and ``text_retrieval_recall@{k}``
    (the fraction of queries with ``rank <= k``, in [0, 1]); and ``{image,text}_retrieval_{mean,median}_rank``.
    The median of an even number of ranks is the mean of the two middle ones.

    Memory and work: queries are processed ``block_size`` at a time against all candidates, into one reused
    float32 buffer, so the extra memory is O(block_size * max(N_img, N_txt)) floats (4 GB for block_size=4096
    against 250k captions; lower it to trade speed for memory), never N_img * N_txt. Each direction makes its
    own pass, i.e. twice the multiply-adds of one full score matrix: the price of reading every rank's own
    score from the very matrix row it is compared against, which keeps the tie rule exact.

    Args:
        image_features: (N_img, D) image embeddings, normally L2-normalized.
        text_features: (N_txt, D) caption embeddings on the same device, normally L2-normalized.
        text_to_image: (N_txt,) integer tensor, the image index of each caption.
        ks: cut-offs for recall@k (positive integers).
        block_size: number of queries scored at once.
        ties: ``pessimistic`` or ``index``.
    """
    _check_ks(ks)
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image, block_size, ties)
    metrics: dict[str, float] = {}
    metrics.update(rank_summary(image_ranks, ks, prefix="image_retrieval_"))
    metrics.update(rank_summary(text_ranks, ks, prefix="text_retrieval_"))
    return metrics


def retrieval_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    block_size: int = 4096,
    ties: TieRule = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """The 1-based ranks behind :func:`retrieval_metrics` (same maths, tie rule and arguments).

    Returns:
        ``(image_retrieval_ranks, text_retrieval_ranks)``: (N_txt,) and (N_img,) int64 tensors on the
        features' device; the first holds one rank per caption query, the second one rank per image query.
    """
    text_to_image = _validate(image_features, text_features, text_to_image, block_size)
    check_tie_rule(ties)
    # float32 scores whatever the storage dtype: fp16 dot products of 512-d vectors tie far too often. One
    # up-front cast (a no-op for float32 inputs) costs N * D floats, small next to one score block.
    image_features = image_features.float()
    text_features = text_features.float()
    # No graph: metrics are never differentiated, and matmul into a preallocated buffer refuses autograd.
    with torch.no_grad():
        image_ranks = _image_retrieval_ranks(image_features, text_features, text_to_image, block_size, ties)
        text_ranks = _text_retrieval_ranks(image_features, text_features, text_to_image, block_size, ties)
    return image_ranks, text_ranks


def rank_to_recall(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k for 1-based ranks: ``{k: mean(ranks <= k)}``. An empty ``ranks`` is an error."""
    if ranks.numel() == 0:
        raise ValueError("rank_to_recall needs at least one rank, got an empty tensor")
    _check_ks(ks)
    return {int(k): (ranks <= k).double().mean().item() for k in ks}


def rank_summary(ranks: Tensor, ks: Sequence[int], prefix: str = "") -> dict[str, float]:
    """``{prefix}recall@{k}`` for each k, ``{prefix}mean_rank`` and ``{prefix}median_rank`` of 1-based ranks."""
    summary = {f"{prefix}recall@{k}": recall for k, recall in rank_to_recall(ranks, ks).items()}
    sorted_ranks = ranks.flatten().sort().values.double()
    n = sorted_ranks.numel()
    # The textbook median (mean of the two middle values), not torch.median's lower middle value.
    median = (sorted_ranks[(n - 1) // 2] + sorted_ranks[n // 2]) / 2
    summary[f"{prefix}mean_rank"] = sorted_ranks.mean().item()
    summary[f"{prefix}median_rank"] = median.item()
    return summary


def _image_retrieval_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, block_size: int, ties: TieRule
) -> Tensor:
    """Text -> image: rank(j) = #{i : s(i, j) >= s(g(j), j)}, which counts the own image once (hence the +1);
    the index rule then takes back the tied images after the own one."""
    num_texts = text_features.shape[0]
    ranks = torch.empty(num_texts, dtype=torch.long, device=text_features.device)
    # One score buffer reused by every block: the only O(block * N_img) allocation, made once instead of once
    # per block (on CPU a fresh multi-GB allocation costs a page fault per 4 KiB).
    buffer = text_features.new_empty(min(block_size, num_texts), image_features.shape[0])
    for start in range(0, num_texts, block_size):
        stop = min(start + block_size, num_texts)
        scores = torch.matmul(text_features[start:stop], image_features.T, out=buffer[: stop - start])
        # The own score is read back from the same matrix, so the comparison below sees bit-identical values
        # and the tie rule holds exactly (a separately computed dot product could round differently).
        own = scores.gather(1, text_to_image[start:stop, None])  # (block, 1)
        tied_after = _tied_after(scores, own, text_to_image[start:stop]) if ties == "index" else 0
        ranks[start:stop] = _count_at_or_above_(scores, own) - tied_after
    return ranks


def _text_retrieval_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, block_size: int, ties: TieRule
) -> Tensor:
    """Image -> text: rank(i) = 1 + #{all j : s(i, j) >= best(i)} - #{correct j : s(i, j) >= best(i)}; the index
    rule then takes back the tied wrong captions after ``first(i)``."""
    num_images = image_features.shape[0]
    device = image_features.device
    # Captions grouped by image: the correct captions of images [start, stop) are then one contiguous slice of
    # `caption_order`, so each block touches only its own O(#captions in block) correct pairs, not an
    # (block, N_txt) membership mask.
    caption_order = torch.argsort(text_to_image, stable=True)
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    # Offsets live on the host: they are only used to slice, and one transfer beats a sync per block.
    offsets = [0] + torch.cumsum(captions_per_image, 0).tolist()
    ranks = torch.empty(num_images, dtype=torch.long, device=device)
    buffer = image_features.new_empty(min(block_size, num_images), text_features.shape[0])  # as above
    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        scores = torch.matmul(image_features[start:stop], text_features.T, out=buffer[: stop - start])
        correct_captions = caption_order[offsets[start] : offsets[stop]]  # (n_correct,)
        query_row = text_to_image[correct_captions] - start  # (n_correct,) row of each correct pair
        correct_scores = scores[query_row, correct_captions]  # (n_correct,), a copy: survives the overwrite
        best = torch.full((stop - start,), float("-inf"), device=device)
        best.scatter_reduce_(0, query_row, correct_scores, reduce="amax")
        # Remove the image's own captions from the count (at least one: the best one itself); what remains are
        # the wrong captions scoring >= best, ties included, which is the pessimistic rule.
        at_best = correct_scores >= best[query_row]  # the correct captions that reach the image's best score
        correct_at_or_above = torch.bincount(query_row[at_best], minlength=stop - start)
        tied_after = 0
        if ties == "index":
            # first(i): the lowest caption index at the best score; the correct captions after it are not wrong
            first = torch.full((stop - start,), scores.shape[1], device=device, dtype=torch.long)
            first.scatter_reduce_(0, query_row[at_best], correct_captions[at_best], reduce="amin")
            correct_after = torch.bincount(
                query_row[at_best & (correct_captions > first[query_row])], minlength=stop - start
            )
            tied_after = _tied_after(scores, best[:, None], first) - correct_after
        ranks[start:stop] = 1 + _count_at_or_above_(scores, best[:, None]) - correct_at_or_above - tied_after
    return ranks


def _tied_after(scores: Tensor, value: Tensor, position: Tensor) -> Tensor:
    """(rows,) ``#{c > position[r] : scores[r, c] == value[r]}``: the candidates the index rule ranks behind a tie.

    One equality pass over the block finds the rows with any tie besides the position itself; only those rows
    (few, with real features) are compared column by column.
    """
    counts = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    tied_rows = torch.nonzero(torch.eq(scores, value).sum(dim=1) > 1).flatten()
    if tied_rows.numel():
        rows = scores[tied_rows] == value[tied_rows]  # (tied rows, candidates)
        after = torch.arange(scores.shape[1], device=scores.device)[None, :] > position[tied_rows, None]
        counts[tied_rows] = (rows & after).sum(dim=1)
    return counts


def _count_at_or_above_(scores: Tensor, threshold: Tensor) -> Tensor:
    """Row-wise ``#{scores >= threshold}`` as int64, overwriting ``scores`` with the 0/1 comparison.

    Why in place: ``(scores >= t).sum(1)`` materializes a bool matrix and then, on CPU, an int64 copy of it,
    8 bytes per score, twice the score block itself and ~10x slower than summing 0.0/1.0 floats in place.
    A float32 sum of 0/1 values is exact while every partial sum stays below 2**24.
    """
    torch.ge(scores, threshold, out=scores)
    sum_dtype = torch.float32 if scores.shape[1] < 2**24 else torch.float64
    return scores.sum(dim=1, dtype=sum_dtype).long()


def _validate(image_features: Tensor, text_features: Tensor, text_to_image: Tensor, block_size: int) -> Tensor:
    """Check shapes, devices and the caption -> image map; return the map as int64 on the features' device."""
    if image_features.ndim != 2:
        raise ValueError(f"image_features must be 2-D (N_img, D), got shape {tuple(image_features.shape)}")
    if text_features.ndim != 2:
        raise ValueError(f"text_features must be 2-D (N_txt, D), got shape {tuple(text_features.shape)}")
    num_images, dim = image_features.shape
    num_texts = text_features.shape[0]
    if text_features.shape[1] != dim:
        raise ValueError(
            f"image_features and text_features must share the embedding size: got D={dim} for images and "
            f"D={text_features.shape[1]} for texts"
        )
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {num_images} and {num_texts}")
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features ({image_features.device}) and text_features ({text_features.device}) must be on the "
            "same device"
        )
    if not (image_features.is_floating_point() and text_features.is_floating_point()):
        raise ValueError(
            f"features must be floating point, got {image_features.dtype} (images) and {text_features.dtype} (texts)"
        )
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image must have shape (N_txt,) = ({num_texts},), one image index per caption, "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.is_floating_point() or text_to_image.is_complex() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    text_to_image = text_to_image.to(device=image_features.device, dtype=torch.long)
    low, high = int(text_to_image.min()), int(text_to_image.max())
    if low < 0 or high >= num_images:
        raise ValueError(
            f"text_to_image values must be image indices in [0, {num_images - 1}], got values in [{low}, {high}]"
        )
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    without_caption = torch.nonzero(captions_per_image == 0).flatten()
    if without_caption.numel() > 0:
        shown = without_caption[:10].tolist()
        raise ValueError(
            f"every image needs at least one caption, but {without_caption.numel()} of {num_images} images have "
            f"none (first indices: {shown}); drop those images or fix text_to_image"
        )
    # A NaN never compares >=, so it would silently turn into a perfect rank.
    if not (torch.isfinite(image_features).all() and torch.isfinite(text_features).all()):
        raise ValueError("image_features and text_features must be finite (found NaN or inf)")
    return text_to_image


def _check_ks(ks: Sequence[int]) -> None:
    # numbers.Integral admits NumPy integers; bool is excluded because recall@True is surely a mistake.
    if len(ks) == 0 or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {list(ks)!r}")
