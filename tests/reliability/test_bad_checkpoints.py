"""Broken checkpoints given to the converter (`convert_mm_to_ckpt.py`) and to the loaders: each fails with an
error naming the file and what is wrong, and the converter leaves no output file behind."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint import CheckpointError, load_checkpoint
from mindspeed_mm_osp import io_atomic
from mindspeed_mm_osp.checkpoint.convert import main as convert
from mindspeed_mm_osp.checkpoint.layout import model_file, tracker_path
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, tp_split_dim
from mindspeed_mm_osp.testing import tiny_predictor_config, tiny_predictor_weights, write_training_checkpoint
from reliability_harness import log

TP, IT = 2, 20


@pytest.fixture(scope="module")
def weights():
    return tiny_predictor_weights()


def _write(root: Path, weights: dict) -> Path:
    """A TP=2 training checkpoint (model and EMA = model + 1)."""
    return write_training_checkpoint(root, weights, {k: v + 1 for k, v in weights.items()}, TP, IT)


def _edit(path: Path, fn) -> None:
    state = torch.load(path, weights_only=False)
    fn(state)
    torch.save(state, path)


def _split_key(weights) -> str:
    return next(k for k in weights if tp_split_dim(k) is not None)


def _replicated_key(weights) -> str:
    return next(k for k in weights if tp_split_dim(k) is None)


# name -> (how the checkpoint is broken, what the error must say)
BREAKS = {
    "missing rank folder": (lambda r, w: shutil.rmtree(model_file(r, IT, 1).parent),
                            "tensor-parallel size 2, but the folder has 1"),
    "rank folder without file": (lambda r, w: model_file(r, IT, 1).unlink(), "checkpoint file missing"),
    "truncated file": (lambda r, w: model_file(r, IT, 1).write_bytes(model_file(r, IT, 1).read_bytes()[:5000]),
                       "truncated or corrupt"),
    "zero-byte file": (lambda r, w: model_file(r, IT, 0).write_bytes(b""), "truncated or corrupt"),
    "wrong TP recorded": (lambda r, w: _edit(model_file(r, IT, 1), lambda s: s.update(
        parallel={"tensor_model_parallel_size": 4})), "tensor-parallel size 4"),
    "extra rank folder": (lambda r, w: shutil.copytree(model_file(r, IT, 1).parent,
                                                       model_file(r, IT, 3).parent), "missing"),
    "foreign state dict": (lambda r, w: torch.save({"state_dict": {"w": torch.zeros(2)}}, model_file(r, IT, 1)),
                           "no 'model' entry"),
    "rank from another iteration": (lambda r, w: _edit(model_file(r, IT, 1), lambda s: s.update(iteration=10)),
                                    "holds iteration 10"),
    "key missing on one rank": (lambda r, w: _edit(model_file(r, IT, 1), lambda s: s["model"].pop(_split_key(w))),
                                "key set differs"),
    "shard of wrong shape": (lambda r, w: _edit(model_file(r, IT, 1), lambda s: s["model"].update(
        {_split_key(w): torch.zeros(3, 3)})), "on TP rank 1"),
    "replicas disagree": (lambda r, w: _edit(model_file(r, IT, 1), lambda s: s["model"].update(
        {_replicated_key(w): s["model"][_replicated_key(w)] + 1})), "differs between TP rank 1"),
    "torn tracker": (lambda r, w: tracker_path(r).write_text("2"), "iteration 2 not found"),
    "garbage tracker": (lambda r, w: tracker_path(r).write_text("twenty"), "expected an iteration number"),
}


@pytest.mark.parametrize("name", list(BREAKS))
@pytest.mark.parametrize("target", ["merge", "split"])
def test_converter_refuses_broken_checkpoint_and_writes_nothing(tmp_path, weights, name, target):
    root, out = _write(tmp_path / "ckpt", weights), tmp_path / "out"
    brk, expected = BREAKS[name]
    brk(root, weights)
    argv = ["--load_dir", str(root), "--save_dir", str(out)] + (["--target-tp", "1"] if target == "split" else [])
    with pytest.raises(SystemExit) as e:
        convert(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and expected in message, message
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    if target == "merge":
        log(f"bad checkpoint '{name}': converter -> {message[:200]}")


def test_converter_ema_export_without_ema_fails_cleanly(tmp_path, weights):
    root, out = _write(tmp_path / "ckpt", weights), tmp_path / "out"
    for rank in range(TP):
        _edit(model_file(root, IT, rank), lambda s: s.pop("ema_model"))
    with pytest.raises(SystemExit, match="no 'ema_model' entry"):
        convert(["--load_dir", str(root), "--save_dir", str(out), "--ema"])
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_converter_split_of_bad_merged_file(tmp_path, weights, content):
    merged, out = tmp_path / "model.pt", tmp_path / "out"
    torch.save(weights, merged)
    merged.write_bytes(merged.read_bytes()[:3000] if content == "truncated" else content)
    with pytest.raises(SystemExit, match=r"error: .*model\.pt: cannot read weights"):
        convert(["--load_dir", str(merged), "--save_dir", str(out), "--target-tp", "2"])
    assert not out.exists()


def test_converter_disk_full_leaves_only_complete_files(tmp_path, weights, monkeypatch):
    """ENOSPC (a real one, from /dev/full) while writing the second output: no partial file, no temp file."""
    root, out = _write(tmp_path / "ckpt", weights), tmp_path / "out"
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).name.startswith(".model.pt.tmp-"):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(io_atomic, "open", full_disk, raising=False)
    with pytest.raises(SystemExit) as e:
        convert(["--load_dir", str(root), "--save_dir", str(out)])
    assert f"error: writing to {out} failed: [Errno {errno.ENOSPC}]" in str(e.value.code)
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if ".tmp-" in n]
    for name in left:  # what is there is complete
        assert name == "model.safetensors"
    log(f"converter disk full on model.pt: exit with ENOSPC named, left {left} (complete), no temp file")


# ------------------------------------------------------------------------------------------------ loaders


def test_training_loader_refuses_wrong_tp_and_broken_files(tmp_path, weights):
    root = _write(tmp_path / "ckpt", weights)
    model = SparseUMMDiT(tiny_predictor_config())
    with pytest.raises(CheckpointError, match="saved with tensor-parallel size 2, this run uses 1"):
        load_checkpoint(root, model)
    shutil.rmtree(model_file(root, IT, 1).parent)
    _edit(model_file(root, IT, 0), lambda s: s.update(parallel={"tensor_model_parallel_size": 1}))
    model_file(root, IT, 0).write_bytes(model_file(root, IT, 0).read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="mp_rank_00/model_optim_rng.pt: cannot read checkpoint"):
        load_checkpoint(root, model)
    torch.save({"model": {"foreign.weight": torch.zeros(2)}, "iteration": IT,
                "parallel": {"tensor_model_parallel_size": 1}}, model_file(root, IT, 0))
    with pytest.raises(CheckpointError, match="model keys differ from this model"):
        load_checkpoint(root, model)


def test_predictor_loader_names_foreign_keys(weights):
    model = SparseUMMDiT(tiny_predictor_config())
    foreign = {**weights, "unexpected.weight": torch.zeros(1)}
    foreign.pop(_split_key(weights))
    with pytest.raises(ValueError, match="does not match SparseUMMDiT"):
        load_merged_state_dict(model, foreign)


@pytest.mark.parametrize("content", ["truncated", "foreign"])
def test_vae_loader_names_the_file(tiny_assets, tmp_path, content):
    from mindspeed_mm_osp.models.ae import load_wfvae_checkpoint
    from mindspeed_mm_osp.models.ae.checkpoint import CheckpointKeyError
    from mindspeed_mm_osp.models.ae.wfvae import WFVAE
    from mindspeed_mm_osp.config import load_model_config

    cfg = load_model_config(tiny_assets["model_json"]).ae
    bad = tmp_path / "merged.ckpt"
    if content == "truncated":
        bad.write_bytes(Path(tiny_assets["models"]["vae"]).read_bytes()[:4096])
    else:
        torch.save({"state_dict": {"encoder.foreign": torch.zeros(2)}}, bad)
    with pytest.raises((CheckpointKeyError, ValueError, OSError)) as e:
        load_wfvae_checkpoint(WFVAE(cfg), bad)
    assert str(bad) in str(e.value), f"{type(e.value).__name__}: {e.value}"


def _pretrain_main(rank, world_size, argv):
    from reliability_harness import cli_main

    return cli_main(argv)


@pytest.mark.parametrize("content", ["missing", "truncated"])
def test_pretrain_with_bad_from_pretrained_exits_naming_the_file(micro_assets, tmp_path, content):
    """pretrain.py with a missing or unreadable `predictor.from_pretrained` exits 2 with one line naming the
    model JSON key and the file, no traceback: the same exit as inference.py with bad weights."""
    import json

    from reliability_harness import run_ranks, train_argv

    weights = tmp_path / "predictor.safetensors"
    if content == "truncated":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cfg = json.loads(micro_assets["model_json"].read_text())
    cfg["predictor"]["from_pretrained"] = str(weights)
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(cfg))
    ok, out = run_ranks(_pretrain_main, 1, train_argv({**micro_assets, "model_json": model_json}))[0]
    assert ok, out
    assert out["code"] == 2, out
    assert "Traceback" not in out["stderr"], out["stderr"]
    line = out["stderr"].strip().splitlines()[-1]
    assert line.startswith(f"pretrain.py: error: {model_json}: predictor.from_pretrained: {weights}:"), line
    assert ("weights file not found" if content == "missing" else "cannot read weights") in line
