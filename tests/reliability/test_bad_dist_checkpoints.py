"""Broken torch_dist checkpoint folders: the converter and the training loader each refuse them with one line
naming the file and what is wrong; a save that never finished (its hidden temporary folder) is never loaded; and a
common state or checkpoint index naming a Python global outside the allow-list is refused before anything runs."""

from __future__ import annotations

import collections
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint import CheckpointError, load_checkpoint
from mindspeed_mm_osp.checkpoint.convert import main as convert
from mindspeed_mm_osp.checkpoint.dist_format import DIST_FORMAT, one_process_group, split_payload, write_full
from mindspeed_mm_osp.checkpoint.dist_safe import COMMON_FILE, DCP_METADATA
from mindspeed_mm_osp.checkpoint.layout import iteration_dir, tracker_path
from mindspeed_mm_osp.checkpoint.manifest import file_digest, read_manifest, write_manifest
from mindspeed_mm_osp.checkpoint.safe_load import UntrustedPickleError
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.testing import tiny_predictor_config, tiny_predictor_weights
from reliability_harness import log

IT = 20


class Payload:
    """A class a pickle names: loading it would import and build it."""


@pytest.fixture(scope="module")
def weights():
    return tiny_predictor_weights()


def _write(root: Path, weights: dict, iteration: int = IT) -> Path:
    """A torch_dist checkpoint of `weights` (model, EMA = model + 1), written in this process."""
    state = {"checkpoint_version": 4.0, "iteration": iteration, "consumed_train_samples": 0, "args": {},
             "model": weights, "ema_model": {k: v + 1 for k, v in weights.items()}}
    tensors, common = split_payload(state)
    write_full(root, iteration, tensors, {**common, "parallel": {"tensor_model_parallel_size": 1}})
    return iteration_dir(root, iteration)


def _shard(it_dir: Path) -> Path:
    return sorted(it_dir.glob("__*.distcp"))[0]


def _replace(it_dir: Path, name: str, data: bytes) -> None:
    """Put `data` in file `name` and record it in the manifest, as a deliberate edit would."""
    (it_dir / name).write_bytes(data)
    digests = read_manifest(it_dir)
    digests[name] = file_digest(it_dir / name)
    write_manifest(it_dir, IT, digests)


def _pickled_common(it_dir: Path) -> None:
    path = it_dir / COMMON_FILE
    torch.save({"common": {"format": DIST_FORMAT, "iteration": IT, "hook": Payload()}}, path)
    _replace(it_dir, COMMON_FILE, path.read_bytes())


# name -> (how the folder is broken, what the error must say)
BREAKS = {
    "truncated shard": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:500]), "(truncated or damaged copy)"),
    "missing shard": (lambda d: _shard(d).unlink(), "listed in the manifest but missing"),
    "missing common state": (lambda d: (d / COMMON_FILE).unlink(), "common.pt: listed in the manifest but missing"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "without manifest.json"),
    "pickled object in common state": (_pickled_common, "needs the Python global(s) test_bad_dist_checkpoints.Payload"),
    "foreign global in the index": (lambda d: _replace(d, DCP_METADATA, pickle.dumps(collections.OrderedDict())),
                                    "needs the Python global collections.OrderedDict"),
    "corrupt index": (lambda d: _replace(d, DCP_METADATA, b"\x80\x04junk"), "cannot read the checkpoint index"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_dist_folder_is_refused_with_one_line(tmp_path, weights, name):
    it_dir = _write(tmp_path / "ckpt", weights)
    brk, expected = BREAKS[name]
    brk(it_dir)
    with pytest.raises(SystemExit) as e:
        convert(["--load_dir", str(tmp_path / "ckpt"), "--save_dir", str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith("error: ") and expected in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()
    with one_process_group(), pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt", SparseUMMDiT(tiny_predictor_config()))
    assert expected in str(info.value)
    if "pickle" in name or "global" in name:
        assert isinstance(info.value, UntrustedPickleError)
    log(f"bad torch_dist folder '{name}': converter -> {message[:200]}")


def test_unfinished_save_is_never_loaded(tmp_path, weights):
    """A save killed before its rename leaves only `.iter_XXXXXXX.tmp`: the tracker and every reader keep the
    previous iteration; a tracker naming the unfinished one is refused, naming it."""
    root = tmp_path / "ckpt"
    _write(root, weights)
    half = _write(tmp_path / "other", weights, IT + 1)
    shutil.copytree(half, root / f".{half.name}.tmp")
    _shard(root / f".{half.name}.tmp").unlink()
    convert(["--load_dir", str(root), "--save_dir", str(tmp_path / "out"), "--format", "pt"])
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True).keys() == weights.keys()
    tracker_path(root).write_text(str(IT + 1))
    with pytest.raises(SystemExit, match=f"iteration {IT + 1} not found"):
        convert(["--load_dir", str(root), "--save_dir", str(tmp_path / "out2")])
