"""The embedding folder and its FAISS index under damage and contention: a corrupted or truncated index file
falls back to exact search (one warning), bad FAISS parameters are one ValueError (exit 2 on the command line,
never an abort), two processes updating meta.json both keep their change, and a damaged meta.json, part or
table is one clear error."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clipforge.io import FolderBusyError
from clipforge.search import meta as store_module
from clipforge.search.meta import StoreError, writer_lock
from clipforge.search.store import EmbeddingStore
from tests.conftest import another_writer

faiss = pytest.importorskip("faiss")

from clipforge.cli import main  # noqa: E402
from clipforge.config.choices import ANN_KINDS  # noqa: E402
from clipforge.search.ann import FaissIndexError, load_faiss_index  # noqa: E402
from clipforge.search.ann_build import build_faiss_index, check_build_parameters  # noqa: E402
from clipforge.search.index import Index  # noqa: E402

WIDTH = 16
PARTS = (50, 70)  # two parts: rows of the second are offset by the first
MODEL = {"checkpoint": "/runs/tiny/last.pt", "step": 30, "fingerprint": "f" * 64, "embed_dim": WIDTH}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_store(root: Path) -> EmbeddingStore:
    """A folder of unit-norm images (two parts, one source) and texts (one part), as ``clipforge embed`` writes."""
    store = EmbeddingStore.open_for_model(root, MODEL, "float16")
    generator = np.random.default_rng(0)
    for kind, sizes in (("images", PARTS), ("texts", (40,))):
        for size in sizes:
            vectors = generator.standard_normal((size, WIDTH)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            if kind == "images":
                number = store.source_number("/data/photos")
                rows = [{"id": f"{size}-{i}.png", "path": "", "source": number, "index": i} for i in range(size)]
            else:
                rows = [{"id": f"caption {size}-{i}"} for i in range(size)]
            store.write_part(kind, vectors, rows)
    return store


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A folder with an IVF index of its images and an HNSW index of its texts, built once."""
    root = tmp_path_factory.mktemp("integrity") / "emb"
    store = make_store(root)
    build_faiss_index(store, "images", "ivf", nlist=4, target_recall=0.99)
    build_faiss_index(store, "texts", "hnsw", hnsw_m=8, target_recall=0.99)
    return root


def fresh_copy(built: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(built, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@contextlib.contextmanager
def warnings_of_clipforge() -> Iterator[list[str]]:
    """The messages clipforge logs at WARNING or above inside the block (caplog is per test, not per example)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("clipforge")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


QUERIES = torch.from_numpy(np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32))


def exact_answer(root: Path, kind: str, queries: torch.Tensor = QUERIES) -> tuple[np.ndarray, np.ndarray]:
    return Index(EmbeddingStore(root), kind=kind, backend="exact").search_vectors(queries, 7)


# -- a damaged index file: exact search, one warning ------------------------------------------------------------
def corrupted(original: bytes, data: st.DataObject) -> bytes:
    """``original`` truncated, or with 1-4 bytes overwritten, as hypothesis draws it."""
    if data.draw(st.booleans(), label="truncate"):
        return original[: data.draw(st.integers(0, len(original) - 1), label="length")]
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="bytes")):
        damaged[data.draw(st.integers(0, len(original) - 1), label="at")] = data.draw(st.integers(0, 255))
    return bytes(damaged)


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["images", "texts"]))
def test_a_damaged_index_file_gives_exact_results_with_one_warning(built: Path, tmp_path: Path, data, kind) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    path = root / f"faiss-{kind}.index"
    damaged = corrupted(path.read_bytes(), data)
    assume(damaged != path.read_bytes())
    path.write_bytes(damaged)
    with warnings_of_clipforge() as warned:
        index = Index(EmbeddingStore(root), kind=kind)  # backend auto
        scores, rows = index.search_vectors(QUERIES, 7)
        index.search_vectors(QUERIES, 3)
    assert index.faiss is None
    assert len(warned) == 1 and str(path) in warned[0] and "clipforge index build" in warned[0]
    expected_scores, expected_rows = exact_answer(root, kind)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)
    with pytest.raises(FaissIndexError, match="build it again"):
        Index(EmbeddingStore(root), kind=kind, backend="faiss")


def test_an_intact_index_is_used_and_agrees_with_exact_search(built: Path) -> None:
    for kind in ("images", "texts"):
        with warnings_of_clipforge() as warned:
            index = Index(EmbeddingStore(built), kind=kind)
            _, rows = index.search_vectors(QUERIES, 5)
        assert index.faiss is not None and warned == []
        _, expected = exact_answer(built, kind)
        assert all(set(found) == set(truth[:5]) for found, truth in zip(rows, expected, strict=True))
    entry = json.loads((built / "meta.json").read_text())["faiss"]["images"]
    data = (built / "faiss-images.index").read_bytes()
    assert entry["bytes"] == len(data) and len(entry["sha256"]) == 64 and entry["dim"] == WIDTH


def test_an_index_from_before_checksums_still_loads_and_impossible_scores_fall_back(built: Path, tmp_path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    meta = json.loads((root / "meta.json").read_text())
    for entry in meta["faiss"].values():
        del entry["bytes"], entry["sha256"], entry["dim"]  # what a build before this change recorded
    (root / "meta.json").write_text(json.dumps(meta))
    assert load_faiss_index(EmbeddingStore(root), "images").ntotal == sum(PARTS)
    # a changed code cannot be seen without a checksum, but the score it gives a unit query can; the HNSW
    # index's SQfp16 codes are the float16 rows as they are (IVF's are residuals from the cell's centre)
    path = root / "faiss-texts.index"
    store = EmbeddingStore(root)
    row = store.open_part(store.part_paths("texts")[0])[3].astype(np.float32)
    data = path.read_bytes()
    code = row.astype(np.float16).tobytes()
    assert data.count(code) == 1
    path.write_bytes(data.replace(code, (np.sign(row) * 60000).astype(np.float16).tobytes()))
    query = torch.from_numpy(row)[None]
    with warnings_of_clipforge() as warned:
        index = Index(EmbeddingStore(root), kind="texts")
        assert index.faiss is not None  # it passed the checks an old entry allows
        scores, rows = index.search_vectors(query, 7)
        index.search_vectors(query, 7)
    assert index.faiss is None and len(warned) == 1 and "for unit vectors" in warned[0]
    expected_scores, expected_rows = exact_answer(root, "texts", query)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)
    with pytest.raises(FaissIndexError, match="for unit vectors"):
        Index(EmbeddingStore(root), kind="texts", backend="faiss").search_vectors(query, 7)
    path = root / "faiss-images.index"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: refused before FAISS reads it
    with warnings_of_clipforge() as warned:
        assert Index(EmbeddingStore(root)).faiss is None
    assert len(warned) == 1 and "truncated" in warned[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda meta: meta["faiss"]["images"].update(count=5), "covers 5 images but the folder now holds 120"),
        (lambda meta: meta["faiss"]["images"].update(file="../../etc/passwd"), "malformed record"),
        (lambda meta: meta["faiss"]["images"].update(sha256=None), "malformed record"),
        (lambda meta: meta["faiss"].update(images=[1, 2]), "malformed record"),
        (lambda meta: meta["faiss"]["images"].update(knob="efSearch"), "does not take efSearch"),
    ],
)
def test_a_bad_index_record_is_one_warning(built: Path, tmp_path: Path, change, message: str) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    meta = json.loads((root / "meta.json").read_text())
    change(meta)
    (root / "meta.json").write_text(json.dumps(meta))
    with warnings_of_clipforge() as warned:
        assert Index(EmbeddingStore(root)).faiss is None
    assert len(warned) == 1 and message in warned[0]
    with pytest.raises(FaissIndexError, match="build it again"):
        Index(EmbeddingStore(root), backend="faiss")


def test_an_index_of_another_store_is_refused(built: Path, tmp_path: Path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    # the texts index under the images' name, with a record that matches the file: 40 rows of the same width
    shutil.copy(root / "faiss-texts.index", root / "faiss-images.index")
    meta = json.loads((root / "meta.json").read_text())
    meta["faiss"]["images"] = {**meta["faiss"]["texts"], "file": "faiss-images.index", "count": sum(PARTS)}
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FaissIndexError, match="holds 40 vectors of width 16; the folder has 120 of 16"):
        Index(EmbeddingStore(root), backend="faiss")


# -- FAISS's parameters: a ValueError with the range, never an abort ---------------------------------------------
INVALID = st.one_of(
    st.fixed_dictionaries({"ann": st.just("hnsw"), "hnsw_m": st.integers(max_value=1) | st.integers(min_value=513)}),
    st.fixed_dictionaries({"nlist": st.integers(max_value=0) | st.integers(min_value=sum(PARTS) + 1)}),
    st.fixed_dictionaries(
        {"target_recall": st.floats(allow_nan=True).filter(lambda value: not 0 < value <= 1) | st.just(float("nan"))}
    ),
    st.fixed_dictionaries({"tune_queries": st.integers(max_value=0) | st.integers(min_value=100_001)}),
    st.fixed_dictionaries({"seed": st.integers(max_value=-1)}),
    st.fixed_dictionaries({"hnsw_m": st.sampled_from([True, 8.0, "8", None])}),
    st.fixed_dictionaries({"ann": st.text(max_size=5).filter(lambda name: name not in ANN_KINDS)}),
    st.fixed_dictionaries(
        {"ann": st.just("ivfpq"), "pq_m": st.integers(max_value=0) | st.sampled_from([3, 5, 6, 7, 9, 32, 1000])}
    ),
)


@SETTINGS
@given(parameters=INVALID)
def test_invalid_faiss_parameters_are_a_value_error_before_faiss(built: Path, parameters: dict) -> None:
    before = {path.name: path.read_bytes() for path in built.iterdir() if path.is_file()}
    with pytest.raises(ValueError, match=r"must be a whole number|choose one|\(0, 1\]|more IVF cells than|not divide"):
        build_faiss_index(EmbeddingStore(built), **parameters)
    assert {path.name: path.read_bytes() for path in built.iterdir() if path.is_file()} == before


def test_the_limits_themselves_build(tmp_path: Path) -> None:
    store = make_store(tmp_path / "emb")
    assert build_faiss_index(store, "texts", "hnsw", hnsw_m=2).factory == "HNSW2,SQfp16"
    assert build_faiss_index(store, "texts", "ivf", nlist=40).factory == "IVF40,SQfp16"  # one row per cell
    assert build_faiss_index(store, "texts", "ivf", nlist=1, target_recall=1.0).value == 1
    check_build_parameters("images", "hnsw", None, 512, 1e-9, 100_000, 0)


# the values the tester reported: an abort, a FAISS traceback, and two that FAISS would have taken or crashed on
CLI_CASES = [
    (["--ann", "hnsw", "--hnsw-m", "0"], "hnsw_m=0 (--hnsw-m"),  # was a FAISS assertion: the process aborted
    (["--nlist", "-5"], "nlist=-5 (--nlist"),  # was a FAISS traceback
    (["--nlist", "121", "--target-recall", "0.5"], "choose from 1 to 120"),  # more cells than rows
    (["--ann", "hnsw", "--hnsw-m", "100000"], "from 2 to 512"),
    (["--target-recall", "7"], "choose one in (0, 1]"),
]


def test_the_command_line_says_one_line_and_exits_2(built: Path, tmp_path: Path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    argv = ["index", "build", "--index", str(root)]
    # the two that took the process down run in a process of their own (an abort would end pytest too)
    command = [sys.executable, "-m", "clipforge", *argv]
    runs = [subprocess.Popen([*command, *case], stderr=subprocess.PIPE, text=True) for case, _ in CLI_CASES[:2]]
    for (case, expected), run in zip(CLI_CASES, runs, strict=False):
        _, error = run.communicate(timeout=120)
        assert run.returncode == 2, (case, error)
        lines = [line for line in error.splitlines() if line.startswith("clipforge index: error: ")]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in error, (case, error)
    for case, expected in CLI_CASES[2:]:
        with contextlib.redirect_stderr(io.StringIO()) as error:
            assert main([*argv, *case]) == 2
        assert error.getvalue().count("\n") == 1 and expected in error.getvalue(), (case, error.getvalue())
    assert json.loads((root / "meta.json").read_text()) == json.loads((built / "meta.json").read_text())


# -- meta.json under contention -------------------------------------------------------------------------------
def _add_sources(root: str, tag: str, count: int, start) -> None:
    """Wait for the other process, then add ``count`` sources, one ``update_meta`` each, through a store opened
    before the other's updates (its snapshot of meta.json is stale: the update must not write it back)."""
    store = EmbeddingStore(root)
    start.wait(timeout=120)
    for number in range(count):
        store.source_number(f"{tag}-{number}")


def test_concurrent_meta_updates_from_two_processes_both_survive(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    make_store(root)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    other = context.Process(target=_add_sources, args=(str(root), "child", 40, start))
    other.start()
    _add_sources(str(root), "parent", 40, start)  # this process is the second writer
    other.join(timeout=120)
    assert other.exitcode == 0
    sources = EmbeddingStore(root).meta["sources"]
    expected = ["/data/photos"] + [f"{tag}-{n}" for tag in ("child", "parent") for n in range(40)]
    assert sorted(sources) == sorted(expected) and sources.index("child-39") > sources.index("child-0")


def test_an_index_build_keeps_a_source_added_since_its_store_was_opened(built: Path, tmp_path: Path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    stale = EmbeddingStore(root)  # opened before the embed below: its meta has no new source
    assert EmbeddingStore(root).source_number("/data/more") == 1
    build_faiss_index(stale, "images", "ivf", nlist=2)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["sources"] == ["/data/photos", "/data/more"] and meta["faiss"]["images"]["factory"] == "IVF2,SQfp16"
    assert set(meta["faiss"]) == {"images", "texts"}


def test_a_second_writer_stops_at_once(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    monkeypatch.setattr(store_module, "META_WAIT_S", 0.2)
    with writer_lock(root):  # this process embeds into the folder: its own meta updates go through
        assert EmbeddingStore(root).source_number("/data/more") == 1
    with another_writer(root, "embed") as pid:  # another process is writing the folder
        with pytest.raises(FolderBusyError, match=f"pid {pid}, clipforge embed"):
            build_faiss_index(EmbeddingStore(root))
        with contextlib.redirect_stderr(io.StringIO()) as error:
            assert main(["index", "build", "--index", str(root)]) == 2
        assert error.getvalue().count("\n") == 1 and "being written by another process" in error.getvalue()
        # a meta update waits a moment for the other writer, then stops
        with pytest.raises(FolderBusyError):
            EmbeddingStore(root).source_number("/data/x")
    assert EmbeddingStore(root).meta["sources"] == ["/data/photos", "/data/more"]


# -- a damaged folder: one clear error ----------------------------------------------------------------------------
def open_everything(root: Path) -> None:
    """What ``clipforge search`` and ``index build`` read: meta.json, the parts, the table, the index."""
    for kind in ("images", "texts"):
        Index(EmbeddingStore(root), kind=kind).search_vectors(QUERIES, 3)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(data=st.data())
def test_a_damaged_meta_json_is_one_clear_error(built: Path, tmp_path: Path, data) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    path = root / "meta.json"
    meta = json.loads(path.read_text())
    how = data.draw(st.sampled_from(["truncate", "bytes", "value", "field"]))
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, path.stat().st_size - 1))])
    elif how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=40)))
    elif how == "value":
        path.write_text(json.dumps(data.draw(JSON)))
    else:  # one field of the real meta.json set to any JSON value
        holder = meta["model"] if data.draw(st.booleans()) else meta
        holder[data.draw(st.sampled_from(sorted(holder)))] = data.draw(JSON)
        path.write_text(json.dumps(meta))
    try:
        open_everything(root)
    except (StoreError, FileNotFoundError) as error:
        assert str(root) in str(error) and "\n" not in str(error)  # it names the folder's file, in one line


@SETTINGS
@given(data=st.data())
def test_a_damaged_part_or_table_is_one_clear_error(built: Path, tmp_path: Path, data) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    part = data.draw(
        st.sampled_from(sorted((root / "images").glob("part-*.npy")) + [root / "texts" / "part-000000.npy"])
    )
    table = part.with_suffix(".jsonl")
    how = data.draw(st.sampled_from(["truncate part", "header", "truncate table", "line", "drop line"]))
    if how == "truncate part":
        part.write_bytes(part.read_bytes()[: data.draw(st.integers(0, part.stat().st_size - 1))])
    elif how == "header":  # a byte of the .npy header: magic, version, dtype, shape
        damaged = bytearray(part.read_bytes())
        damaged[data.draw(st.integers(0, 127))] = data.draw(st.integers(0, 255))
        part.write_bytes(bytes(damaged))
    elif how == "truncate table":
        table.write_bytes(table.read_bytes()[: data.draw(st.integers(0, table.stat().st_size - 2))])
    elif how == "line":  # one row replaced by other text
        lines = table.read_text().splitlines()
        lines[data.draw(st.integers(0, len(lines) - 1))] = data.draw(
            st.text(min_size=1).filter(str.strip) | JSON.map(json.dumps)
        )
        table.write_text("\n".join(lines) + "\n")
    else:
        lines = table.read_text().splitlines(keepends=True)
        del lines[data.draw(st.integers(0, len(lines) - 1))]
        table.write_text("".join(lines))
    try:
        open_everything(root)
    except StoreError as error:
        assert str(part.name) in str(error) or table.name in str(error), error
    else:  # a header byte that changes nothing numpy reads (a space of padding, a shape spelt the same)
        assert how in ("header", "line")


def test_the_command_line_names_a_damaged_folder_in_one_line(built: Path, tmp_path: Path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    cases = {
        "meta.json": lambda: (root / "meta.json").write_text("{not json"),
        "part-000001.npy": lambda: (root / "images" / "part-000001.npy").write_bytes(b"\x93NUMPY"),
        "part-000000.jsonl line 3": lambda: _replace_line(root / "images" / "part-000000.jsonl", 2, "{oops"),
    }
    for expected, damage in cases.items():
        fresh_copy(built, root)
        damage()
        with contextlib.redirect_stderr(io.StringIO()) as error:
            assert main(["index", "build", "--index", str(root)]) == 2
        assert error.getvalue().count("\n") == 1 and expected in error.getvalue(), error.getvalue()
    (tmp_path / "file").write_text("x")
    with contextlib.redirect_stderr(io.StringIO()) as error:
        assert main(["index", "build", "--index", str(tmp_path / "file")]) == 2
    assert "is a file, not an embedding folder" in error.getvalue()


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number] = text
    path.write_text("\n".join(lines) + "\n")


def test_rows_from_a_source_meta_json_lost_are_a_clear_error(built: Path, tmp_path: Path) -> None:
    root = fresh_copy(built, tmp_path / "emb")
    meta = json.loads((root / "meta.json").read_text())
    meta["sources"] = []  # what an index build that rewrote meta.json during an embed left behind
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not list"):
        Index(EmbeddingStore(root)).load_image(0)
    with pytest.raises(ValueError, match="positive whole number"):
        Index(EmbeddingStore(root)).search_vectors(QUERIES, 0)
