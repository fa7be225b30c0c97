"""An embedding run's plan: every item in exactly one chunk of one block, blocks dealt to the processes in turn,
part names that sort in input order whatever the number of processes; a saved plan read back, a damaged one or one
of another input dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.search import embed as embed_module
from clipforge.search.embed import embed_images
from clipforge.search.plan import MIN_BLOCKS, EmbedPlan, ids_digest, new_plan, pending_plan
from clipforge.search.store import EmbeddingStore


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.integers(1, 300),
    chunk_size=st.integers(1, 40),
    part_rows=st.integers(1, 120),
    world_size=st.integers(1, 9),
    run=st.integers(0, 999_999),
)
def test_every_item_is_in_one_chunk_and_the_parts_sort_in_input_order(
    tmp_path: Path, items: int, chunk_size: int, part_rows: int, world_size: int, run: int
) -> None:
    positions = np.arange(items, dtype=np.int64) * 3  # any increasing positions (items already stored are skipped)
    plan = EmbedPlan(run, 0, positions, chunk_size, max(1, part_rows // chunk_size), "0" * 64)
    dealt = sorted(block for rank in range(world_size) for block in plan.blocks_for(rank, world_size))
    assert dealt == list(range(len(plan)))  # each block to exactly one process
    names, chunks_in_order = [], []
    for block in range(len(plan)):
        chunks = plan.chunks(block)
        assert 1 <= len(chunks) <= plan.chunks_per_block and all(1 <= len(c) <= chunk_size for c in chunks)
        chunks_in_order += chunks
        names += [plan.part_name(block, number) for number in range(len(chunks))]
        assert plan.part_name(block) < plan.part_name(block + 1)
    assert np.array_equal(np.concatenate(chunks_in_order), positions)
    assert names == sorted(names) and len(set(names)) == len(names)  # chunk parts sort in input order too
    assert all(name.startswith(f"part-{run:06d}-") for name in names)
    plan.save(tmp_path)
    loaded = EmbedPlan.load(tmp_path / plan.file_name)
    assert loaded is not None and np.array_equal(loaded.positions, positions)
    assert (loaded.run, loaded.chunk_size, loaded.chunks_per_block) == (run, chunk_size, plan.chunks_per_block)


def test_the_digest_depends_on_every_id_and_where_it_is_cut() -> None:
    assert ids_digest(["ab", "c"]) != ids_digest(["a", "bc"]) != ids_digest(["bc", "a"])
    assert ids_digest(["a", "b"]) == ids_digest(iter(["a", "b"]))


def test_only_a_plan_of_the_same_input_with_the_same_ids_is_taken_up(tmp_path: Path) -> None:
    ids = [f"item {n}" for n in range(10)]
    plan = new_plan(tmp_path, 3, [2, 5, 7], [ids[2], ids[5], ids[7]], chunk_size=2, part_rows=4)
    plan.save(tmp_path)
    assert plan.run == 0 and new_plan(tmp_path, 3, [1], [ids[1]], 2, 4).run == 1  # numbered after the saved plan

    def ids_at(positions):
        return [ids[int(p)] for p in positions] if positions.max() < len(ids) else None

    assert pending_plan(tmp_path, 4, ids_at) is None  # another input's plan: dropped
    assert not (tmp_path / plan.file_name).exists()
    plan.save(tmp_path)
    ids[5] = "another file now"  # the input changed under the plan: dropped
    assert pending_plan(tmp_path, 3, ids_at) is None and not (tmp_path / plan.file_name).exists()
    ids[5] = "item 5"
    plan.save(tmp_path)
    found = pending_plan(tmp_path, 3, ids_at)
    assert found is not None and found.digest == plan.digest
    (tmp_path / plan.file_name).write_bytes(b"PK\x03\x04 damaged")
    assert pending_plan(tmp_path, 3, ids_at) is None and not (tmp_path / plan.file_name).exists()


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from clipforge.interop.load import load_checkpoint

    return load_checkpoint(tiny_checkpoint[0])


def test_a_stopped_run_is_taken_up_and_new_files_follow_it(
    tiny_checkpoint, loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, images = tiny_checkpoint
    layout = {"chunk_size": 2, "part_rows": 6, "progress": False}
    reference = embed_images(loaded, checkpoint, images, tmp_path / "reference", **layout).store
    original, calls = embed_module._encode_chunk, {"count": 0}

    def stop_at_the_fifth_chunk(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_encode_chunk", stop_at_the_fifth_chunk)
    out = tmp_path / "emb"
    with pytest.raises(KeyboardInterrupt):
        embed_images(loaded, checkpoint, images, out, **layout)
    monkeypatch.setattr(embed_module, "_encode_chunk", original)
    assert [p.name for p in (out / "images").glob("plan-*")] == ["plan-000000.npz"]
    # block 0 (chunks 0-2) merged, chunk 3 of block 1 committed alone
    assert sorted(p.stem for p in EmbeddingStore(out).part_paths("images")) == [
        "part-000000-000000",
        "part-000000-000001-000000",
    ]
    # another run with other settings takes the plan up as it was laid out, then embeds what it did not cover
    report = embed_images(loaded, checkpoint, images, out, chunk_size=8, part_rows=8, progress=False)
    assert (report.embedded, report.already_done) == (16, 8)
    for kind_file in sorted((reference / "images").glob("part-*")):
        assert (out / "images" / kind_file.name).read_bytes() == kind_file.read_bytes(), kind_file.name
    assert not list((out / "images").glob("plan-*"))


@settings(max_examples=200, deadline=None)
@given(items=st.integers(1, 100_000), chunk_size=st.integers(1, 512), part_rows=st.integers(1, 8192))
def test_a_short_run_is_cut_into_enough_blocks_for_every_process_and_the_layout_ignores_n(
    items: int, chunk_size: int, part_rows: int
) -> None:
    """Blocks are what the processes share out: 2,000 images must not be one block (one busy process), and the
    layout depends on the input alone, so any number of processes writes the same parts."""
    plan = new_plan(Path("/nonexistent"), 0, range(items), [str(n) for n in range(items)], chunk_size, part_rows)
    chunks = -(-items // chunk_size)
    assert 1 <= plan.block_rows <= max(chunk_size, part_rows)  # never larger than asked
    assert len(plan) >= min(chunks, MIN_BLOCKS)  # as many blocks as the chunks allow, up to MIN_BLOCKS
    if len(plan) > MIN_BLOCKS and plan.chunks_per_block < part_rows // chunk_size:  # cut smaller only for that
        assert len(plan) < 2 * MIN_BLOCKS + 2
