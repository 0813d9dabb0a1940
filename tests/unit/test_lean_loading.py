"""Memory-lean loading of merged and released weights: each TP rank reads only its shard, and gets exactly the
tensors today's whole-file loader followed by `shard_state_dict` gives, for safetensors and torch files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm_osp.checkpoint.layout import CheckpointError
from mindspeed_mm_osp.checkpoint.manifest import tensors_checksum
from mindspeed_mm_osp.checkpoint.reader import TENSORS_CHECKSUM_KEY, load_weights, load_weights_shard
from mindspeed_mm_osp.checkpoint.weights import load_predictor_shard
from mindspeed_mm_osp.io_atomic import atomic_save_safetensors
from mindspeed_mm_osp.models.predictor import build_predictor, local_state_dict, shard_state_dict, tp_split_dim
from mindspeed_mm_osp.testing import run_distributed
from mindspeed_mm_osp.testing.tiny import tiny_predictor_config, tiny_predictor_weights

TP = 2


@pytest.fixture(scope="module")
def weights():
    return tiny_predictor_weights(seed=3)


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
    """The same weights as merged safetensors (with its checksum), a released-style wrapped .pt with
    `_extra_state` placeholders, and a .pt in torch's pre-zip format (which cannot be memory-mapped)."""
    root = tmp_path_factory.mktemp("weights")
    atomic_save_safetensors(weights, root / "model.safetensors", {TENSORS_CHECKSUM_KEY: tensors_checksum(weights)})
    released = {**weights, "blocks.0.attn1._extra_state": None}
    torch.save({"ema_state_dict": released}, root / "model_ema.pt")
    torch.save({"model": weights}, root / "legacy.pt", _use_new_zipfile_serialization=False)
    return root


def _today(path):
    """The whole-file read the trainer and the sampler used before lean loading."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("ema_state_dict", state.get("model", state))
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["model.safetensors", "model_ema.pt", "legacy.pt"])
def test_each_rank_gets_exactly_todays_shard(files, weights, name):
    path = files / name
    assert any(tp_split_dim(k) == 1 for k in weights) and any(tp_split_dim(k) == 0 for k in weights)
    for rank in range(TP):
        _assert_equal(load_weights_shard(path, rank, TP), shard_state_dict(_today(path), rank, TP))
    _assert_equal(load_weights(path), _today(path))


def test_shard_is_not_a_view_of_the_file(files):
    """The returned tensors own their memory: the file's mapping goes when the loader returns."""
    shard = load_weights_shard(files / "model_ema.pt", 1, TP)
    sizes = {v.untyped_storage().nbytes() for v in shard.values()}
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in shard.values()), sizes


def test_verify_reads_the_checksum_lazily_and_catches_damage(files, weights, tmp_path):
    load_weights_shard(files / "model.safetensors", 0, TP, verify=True)
    key = next(iter(weights))
    changed = {**weights, key: weights[key] + 1}
    atomic_save_safetensors(changed, tmp_path / "bad.safetensors", {TENSORS_CHECKSUM_KEY: tensors_checksum(weights)})
    with pytest.raises(CheckpointError, match="checksum .* differs"):
        load_weights_shard(tmp_path / "bad.safetensors", 1, TP, verify=True)


def test_a_split_dim_that_does_not_divide_is_refused_naming_the_file(files):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights .*not divisible by TP=3"):
        load_weights_shard(files / "model.safetensors", 0, 3)


def _build_both(rank: int, world_size: int, path: str) -> bool:
    from mindspeed_mm_osp.parallel import ParallelDims

    dims = ParallelDims.current()
    cfg, cpu = tiny_predictor_config(), torch.device("cpu")
    lean = build_predictor(cfg, load_predictor_shard(path, dims.tp_rank, dims.tp), torch.float32, cpu,
                           dims=dims, tp_local=True)
    whole = build_predictor(cfg, load_weights(path), torch.float32, cpu, dims=dims)
    _assert_equal(local_state_dict(lean), local_state_dict(whole))
    return True


def test_tp2_predictor_from_lean_shards_equals_todays(files):
    assert run_distributed(_build_both, TP, str(files / "model_ema.pt"), tp=TP) == [True, True]
