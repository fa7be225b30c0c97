"""Embed -> search round trip, resumable embedding, failures listed, exact blockwise top-k against a reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.cli import main
from clipforge.interop.load import load_checkpoint
from clipforge.search import embed as embed_module
from clipforge.search import exact as exact_module
from clipforge.search.embed import embed_images, embed_text_file
from clipforge.search.exact import exact_search
from clipforge.search.index import Index
from clipforge.search.store import EmbeddingStore


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint[0])


def copy_images(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_round_trip_each_image_finds_itself_first(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    report = embed_images(loaded, checkpoint, images, tmp_path / "emb", progress=False)
    assert (report.embedded, report.already_done, report.failed) == (24, 0, [])
    index = Index.load(tmp_path / "emb", loaded)
    assert len(index) == 24
    matrix = np.concatenate(index.matrices)
    assert matrix.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(matrix.astype(np.float32), axis=1), 1.0, atol=2e-3)
    for path in sorted(images.glob("*.png"))[:6]:
        hits = index.search(image=path, k=3)
        assert hits[0].path == str(path.resolve())
        assert hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert [hit.rank for hit in hits] == [1, 2, 3]
    row = index.table.ids.index(str((images / "large_red_circle.png").resolve()))
    assert index.search(row=row, k=1)[0].row == row
    text_hits = index.search(text="a large red circle", k=5)
    assert len(text_hits) == 5 and all(a.score >= b.score for a, b in zip(text_hits, text_hits[1:], strict=False))
    with pytest.raises(ValueError, match="empty"):
        index.search(text="  ")


def test_embedding_resumes_after_a_crash_and_skips_what_is_done(
    tiny_checkpoint, loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, images = tiny_checkpoint
    uninterrupted = embed_images(loaded, checkpoint, images, tmp_path / "full", chunk_size=8, progress=False)
    calls = {"count": 0}
    original = embed_module._encode_chunk

    def crash_on_second_chunk(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt  # the user stops the run in the middle
        return original(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_encode_chunk", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed_images(loaded, checkpoint, images, tmp_path / "resumed", chunk_size=8, progress=False)
    monkeypatch.setattr(embed_module, "_encode_chunk", original)
    resumed = embed_images(loaded, checkpoint, images, tmp_path / "resumed", chunk_size=8, progress=False)
    assert (resumed.embedded, resumed.already_done) == (16, 8)

    def by_id(folder: Path) -> dict[str, np.ndarray]:
        store = EmbeddingStore(folder)
        return dict(zip(store.table("images").ids, np.concatenate(store.matrices("images")), strict=True))

    full, partial = by_id(uninterrupted.store), by_id(resumed.store)
    assert sorted(full) == sorted(partial)
    for identifier, embedding in full.items():
        np.testing.assert_array_equal(partial[identifier], embedding)
    again = embed_images(loaded, checkpoint, images, tmp_path / "resumed", progress=False)
    assert (again.embedded, again.already_done) == (0, 24)


def test_new_and_broken_files_are_embedded_or_listed_not_fatal(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    folder = copy_images(images, tmp_path / "images")
    embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    shutil.copy(folder / "small_red_circle.png", folder / "nested_copy.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    report = embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    assert (report.embedded, report.already_done) == (1, 24)
    assert [Path(f["id"]).name for f in report.failed] == ["broken.jpg"]
    assert "broken.jpg" in (tmp_path / "emb" / "images" / "failed.jsonl").read_text()


def test_a_folder_of_another_model_is_refused(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    embed_images(loaded, checkpoint, images, tmp_path / "emb", progress=False)
    other = load_checkpoint(checkpoint)
    with torch.no_grad():
        other.model.log_logit_scale.add_(1.0)
    with pytest.raises(ValueError, match="another model"):
        embed_images(other, checkpoint, images, tmp_path / "emb", progress=False)
    with pytest.raises(ValueError, match="another model"):
        Index.load(tmp_path / "emb", other)


def test_texts_are_embedded_once_and_searchable(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    checkpoint, _ = tiny_checkpoint
    captions = tmp_path / "captions.txt"
    captions.write_text("a large red circle\n\na small blue square\na large red circle\n")
    report = embed_text_file(loaded, checkpoint, captions, tmp_path / "emb", progress=False)
    assert report.embedded == 2
    index = Index.load(tmp_path / "emb", loaded, kind="texts")
    hit = index.search(text="a small blue square", k=1)[0]
    assert hit.id == "a small blue square" and hit.score == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(("block_rows", "workers"), [(7, 1), (64, 1), (5, 2), (1000, 3)])
def test_exact_search_matches_a_plain_reference(block_rows: int, workers: int) -> None:
    generator = np.random.default_rng(0)
    parts = [generator.standard_normal((n, 16)).astype(np.float16) for n in (23, 1, 40)]
    parts[2][5] = parts[0][3]  # an exact tie: the lower row comes first
    queries = torch.from_numpy(generator.standard_normal((4, 16)).astype(np.float32))
    queries[1] = torch.from_numpy(parts[0][3].astype(np.float32))
    scores, rows = exact_search(parts, queries, k=6, block_rows=block_rows, workers=workers)
    everything = np.concatenate(parts).astype(np.float64)
    for q in range(len(queries)):
        reference = everything @ queries[q].double().numpy()
        expected = sorted(range(len(reference)), key=lambda r: (-reference[r], r))[:6]
        assert list(rows[q]) == expected
        np.testing.assert_allclose(scores[q], reference[expected], rtol=1e-5, atol=1e-5)
    assert list(rows[1][:2]) == [3, 23 + 1 + 5]
    small_scores, small_rows = exact_search(parts, queries, k=1000, block_rows=block_rows, workers=workers)
    assert small_rows.shape == (4, 64) and sorted(small_rows[0]) == list(range(64))


@pytest.mark.parametrize(("sizes", "block_rows", "workers"), [((23, 1, 40), 5, 2), ((64,), 64, 3), ((10, 7), 4, 3)])
def test_workers_stream_equal_row_counts_that_cover_every_row_once(sizes, block_rows: int, workers: int) -> None:
    parts = [np.zeros((n, 4), np.float16) for n in sizes]
    shares = exact_module._shares(parts, block_rows, workers)
    assert len(shares) == min(workers, -(-sum(sizes) // block_rows))
    covered = [first + i for share in shares for _, _, first, rows in share for i in range(rows)]
    assert covered == list(range(sum(sizes)))  # each worker's rows in order, the workers one after another
    counts = [sum(rows for *_, rows in share) for share in shares]
    assert max(counts) - min(counts) <= 1
    for share in shares:
        for matrix, start, _, rows in share:
            assert 0 < rows <= block_rows and start + rows <= len(matrix)


@pytest.mark.parametrize(("block_rows", "workers", "k"), [(50, 1, 10), (37, 2, 5), (4096, 1, 1), (9, 3, 200)])
@pytest.mark.parametrize("as_tensors", [False, True])
def test_single_query_float16_kernel_is_exact(
    block_rows: int, workers: int, k: int, as_tensors: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact_module, "_FP16_BLOCK_ROWS", block_rows)  # several blocks and shares
    calls = []
    monkeypatch.setattr(exact_module, "_scan_float16", _spy(exact_module._scan_float16, calls))
    generator = np.random.default_rng(1)
    rows_ = generator.standard_normal((600, 64)).astype(np.float32)
    # near-duplicates of a query: close scores at the top; rows of any norm (the kernel needs no unit rows)
    rows_[100:140] = rows_[7] + 0.02 * generator.standard_normal((40, 64))
    rows_ *= generator.uniform(0.5, 2.0, (600, 1)).astype(np.float32)
    rows_[450] = rows_[100]  # an exact tie across parts: the lower row first
    parts = [rows_[:333].astype(np.float16), rows_[333:].astype(np.float16)]
    if as_tensors:
        parts = [torch.from_numpy(part) for part in parts]
    stored = np.concatenate([np.asarray(part) for part in parts]).astype(np.float64)
    for query in (torch.from_numpy(rows_[100]), torch.randn(64)):
        scores, rows = exact_search(parts, query[None], k=k, workers=workers)
        reference = stored @ query.double().numpy()
        expected = sorted(range(len(reference)), key=lambda r: (-reference[r], r))[:k]
        assert list(rows[0]) == expected
        np.testing.assert_allclose(scores[0], reference[expected], rtol=1e-5, atol=1e-5)
        # the float32 blocks kernel (two queries) ranks the same rows
        _, float32_rows = exact_search(parts, torch.stack([query, query]), k=k, block_rows=block_rows, workers=workers)
        assert list(float32_rows[0]) == expected
    assert calls and all(len(share) >= 1 for share, *_ in calls)
    assert len(calls) == 2 * min(workers, -(-600 // block_rows))  # the float16 kernel ran, once per share


def _spy(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def test_cli_embed_then_search_prints_ranked_paths_and_draws_a_grid(
    tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == [str(images.resolve())] and meta["dtype"] == "float16"
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    argv = ["search", "--index", str(out), "--checkpoint", str(checkpoint), "--query", "a red circle", "--top", "4"]
    assert main([*argv, "--grid", str(grid), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["1", "2", "3", "4"]
    assert all(line.split()[2].endswith(".png") for line in lines[:4])
    assert grid.stat().st_size > 1000
    query = images / "small_green_square.png"
    image_argv = ["search", "--index", str(out), "--checkpoint", str(checkpoint), "--image", str(query)]
    assert main([*image_argv, "--top", "1"]) == 0
    assert capsys.readouterr().out.split()[2] == str(query.resolve())
    assert main(["search", "--index", str(out), "--checkpoint", str(checkpoint), "--query", " "]) == 2
    assert "empty" in capsys.readouterr().err


def test_shards_are_embedded_with_their_keys(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    shard_helpers = pytest.importorskip("tests.data.shard_helpers")
    checkpoint, _ = tiny_checkpoint
    spec = shard_helpers.write_shards(tmp_path / "shards", shard_helpers.shapes_samples(), shard_size=10)
    report = embed_images(loaded, checkpoint, spec, tmp_path / "emb", progress=False)
    assert report.embedded == 24
    index = Index.load(tmp_path / "emb", loaded)
    assert index.table.ids[0].endswith("00000.tar:000000000") and index.table.paths[0] == ""
    assert index.load_image(23).size == (32, 32)  # re-read from its shard: no file of its own
    assert index.search(row=23, k=1)[0].row == 23


def test_faiss_index_agrees_with_exact_search(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from clipforge.search.ann_build import build_faiss_index

    checkpoint, images = tiny_checkpoint
    embed_images(loaded, checkpoint, images, tmp_path / "emb", progress=False)
    report = build_faiss_index(EmbeddingStore(tmp_path / "emb"), ann="ivf", nlist=2, target_recall=0.99)
    assert report.recall_at_10 >= 0.99
    approximate = Index.load(tmp_path / "emb", loaded, backend="faiss")
    exact = Index.load(tmp_path / "emb", loaded, backend="exact")
    assert approximate.faiss is not None and exact.faiss is None
    for text in ("a red circle", "a small blue triangle"):
        assert {h.row for h in approximate.search(text=text, k=5)} == {h.row for h in exact.search(text=text, k=5)}
