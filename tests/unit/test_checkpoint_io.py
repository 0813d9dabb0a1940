"""Checkpoint files: layout, atomic writes, clear errors (single process, no optimizer); the package's one atomic
write (`io_atomic`)."""

import errno

import pytest
import torch

from mindspeed_mm_osp.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, read_tracker, save_checkpoint
from mindspeed_mm_osp import io_atomic
from mindspeed_mm_osp.checkpoint import io as ckpt_io
from mindspeed_mm_osp.checkpoint.reader import read_checkpoint


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))


def test_layout_and_round_trip(tmp_path):
    src = _model(0)
    path = save_checkpoint(tmp_path, 12, src, consumed_train_samples=96, args={"lr": 1e-4})
    assert path == tmp_path / "iter_0000012" / "mp_rank_00" / "model_optim_rng.pt"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    state = torch.load(path, weights_only=False)
    assert {"model", "iteration", "consumed_train_samples", "args", "rng_state", "checkpoint_version"} <= set(state)
    expected_rng = torch.get_rng_state()
    dst = _model(1)
    loaded = load_checkpoint(tmp_path, dst)
    assert (loaded.iteration, loaded.consumed_train_samples, loaded.args) == (12, 96, {"lr": 1e-4})
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path, dst, finetune=True).iteration == 0


def test_no_tracker_means_fresh_start(tmp_path):
    assert load_checkpoint(tmp_path, _model(0)) is None
    assert read_tracker(tmp_path) is None


def _failing_writer(obj, f):
    f.write(b"partial bytes of a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _model(0)
    save_checkpoint(tmp_path, 1, first)
    monkeypatch.setattr(ckpt_io, "_write_payload", _failing_writer)
    with pytest.raises(CheckpointWriteError, match=r"No space left.*previous checkpoint \(1\)"):
        save_checkpoint(tmp_path, 2, _model(5))
    monkeypatch.undo()
    assert read_tracker(tmp_path) == 1
    assert not (tmp_path / "iter_0000002").exists()
    restored = _model(9)
    assert load_checkpoint(tmp_path, restored).iteration == 1
    assert torch.equal(restored[0].weight, first[0].weight)
    # A failed overwrite of an existing iteration leaves its file intact too.
    monkeypatch.setattr(ckpt_io, "_write_payload", _failing_writer)
    with pytest.raises(CheckpointWriteError):
        save_checkpoint(tmp_path, 1, _model(5))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, _model(9)).iteration == 1


def test_missing_truncated_and_foreign_files_name_the_file(tmp_path):
    path = save_checkpoint(tmp_path, 3, _model(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="iter_0000003/mp_rank_00/model_optim_rng.pt.*truncated"):
        load_checkpoint(tmp_path, _model(0))
    path.unlink()
    with pytest.raises(CheckpointError, match="model_optim_rng.pt: checkpoint file not found"):
        load_checkpoint(tmp_path, _model(0))
    with pytest.raises(CheckpointError, match="iter_0000007: checkpoint directory not found"):
        load_checkpoint(tmp_path, _model(0), iteration=7)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        load_checkpoint(tmp_path, _model(0))


def test_resume_refuses_a_file_recording_another_iteration_or_tp_size(tmp_path):
    """Resume checks each file against its folder as the converter does (one reader)."""
    path = save_checkpoint(tmp_path, 3, _model(0))
    (path.parent.parent / "manifest.json").unlink()  # edited below: its sizes would no longer match
    state = torch.load(path, weights_only=False)
    torch.save({**state, "iteration": 5}, path)
    with pytest.raises(CheckpointError, match="model_optim_rng.pt: holds iteration 5, expected 3"):
        load_checkpoint(tmp_path, _model(0))
    torch.save({**state, "parallel": {"tensor_model_parallel_size": 2}}, path)
    with pytest.raises(CheckpointError, match="written by a run with tensor-parallel size 2, but the folder has 1"):
        load_checkpoint(tmp_path, _model(0))


def test_model_mismatch_is_reported(tmp_path):
    save_checkpoint(tmp_path, 1, _model(0))
    other = torch.nn.Sequential(torch.nn.Linear(4, 7))
    with pytest.raises(CheckpointError, match="model_optim_rng.pt: model weights do not fit"):
        load_checkpoint(tmp_path, other)


def test_checkpoint_reader_returns_every_rank_of_an_iteration(tmp_path):
    save_checkpoint(tmp_path, 4, _model(0), consumed_train_samples=8)
    saved = read_checkpoint(tmp_path)
    assert (saved.iteration, saved.tp_size, saved.directory.name, saved.lora) == (4, 1, "iter_0000004", None)
    assert saved.files == [tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"]
    assert saved.has("model") and not saved.has("ema_model")
    assert torch.equal(saved.ranks[0].weights("model")["0.weight"], _model(0)[0].weight)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp_file(tmp_path, failure):
    path = tmp_path / "out" / "report.json"
    io_atomic.atomic_write_text(path, "old")

    def half_then_fail(f):
        f.write(b"half of the new ")
        f.flush()
        raise failure

    with pytest.raises(type(failure)):
        io_atomic.atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_atomic_write_replaces_and_clears_temp_files_of_killed_writers(tmp_path):
    path = tmp_path / "video.mp4"
    stale = tmp_path / ".video.mp4.tmp-999999"  # what a SIGKILLed writer leaves behind
    stale.write_bytes(b"partial")
    assert io_atomic.atomic_write(path, lambda f: f.write(b"new")) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]
    assert path.read_bytes() == b"new"


def test_atomic_safetensors_written_by_name_round_trips(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(4, dtype=torch.bfloat16)}
    path = io_atomic.atomic_save_safetensors(tensors, tmp_path / "w.safetensors", {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
