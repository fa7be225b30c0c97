"""End-to-end on WebDataset shards: training runs, and a resumed run (other worker count) equals an uninterrupted one."""

from pathlib import Path

import torch

from clipforge.checkpoint import read_checkpoint
from clipforge.train.loop import train
from tests.conftest import tiny_config
from tests.data.shard_helpers import shapes_samples, write_shards


def test_resume_on_shards_equals_uninterrupted_run(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "shards", shapes_samples(), 4)  # 24 samples in 6 shards
    common = {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "keep_checkpoints": 2}
    data = {"kind": "webdataset", "path": spec, "shuffle_buffer": 6}

    def config(workers: int):
        return tiny_config(Path(spec), tmp_path / "run", train=common, data={**data, "num_workers": workers})

    full = train(config(2))  # two loader workers: two streams of 12 samples an epoch; the first ends in step 3
    uninterrupted = read_checkpoint(full.checkpoint)
    at_step_3 = read_checkpoint(tmp_path / "run" / "step_3.pt")
    assert at_step_3.training.samples_seen == 24 and at_step_3.training.data_streams == 2
    assert full.history[-1]["skipped_images"] == 0

    resumed = train(config(0), resume=tmp_path / "run" / "step_3.pt")  # no workers: the two streams are kept
    assert resumed.step == 6 and read_checkpoint(resumed.checkpoint).training.data_streams == 2
    continued = read_checkpoint(resumed.checkpoint).weights
    for key, value in uninterrupted.weights.items():
        assert torch.allclose(value, continued[key], atol=1e-6), key
    assert any(not torch.equal(v, at_step_3.weights[k]) for k, v in uninterrupted.weights.items())
