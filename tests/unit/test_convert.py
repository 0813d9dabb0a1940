"""Checkpoint converter: merge TP shards (model / EMA), split back, file formats, and failures that write nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import main, merge_checkpoint, save_split_checkpoint, split_weights
from mindspeed_mm_osp.checkpoint.io import atomic_save
from mindspeed_mm_osp.checkpoint.layout import CheckpointError, iteration_dir, read_tracker
from mindspeed_mm_osp.checkpoint.reader import load_weights
from mindspeed_mm_osp import testing
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict, tp_split_dim
from mindspeed_mm_osp.testing import TINY_PREDICTOR, tiny_predictor_config, tiny_predictor_weights

@pytest.fixture(scope="module")
def full():
    return tiny_predictor_weights()


@pytest.fixture(scope="module")
def ema(full):
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in full.items()}


def write_training_checkpoint(root, full, ema, tp, iteration=20):
    """With megatron placeholder entries, which the converter drops."""
    return testing.write_training_checkpoint(root, full, ema, tp, iteration, placeholder=True)


def assert_same(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_restores_full_state_and_split_restores_shards(tmp_path, full, ema, tp):
    write_training_checkpoint(tmp_path, full, ema, tp)
    merged = merge_checkpoint(tmp_path)
    assert (merged.tp_size, merged.iteration, merged.ema) == (tp, 20, False)
    assert_same(merged.state_dict, full)
    assert_same(merge_checkpoint(tmp_path, ema=True).state_dict, ema)
    for rank, shard in enumerate(split_weights(merged.state_dict, tp)):
        saved = torch.load(iteration_dir(tmp_path, 20) / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")["model"]
        saved.pop("attn1_like._extra_state")
        assert_same(shard, saved)
    if tp > 1:  # split keys really are sharded
        key = next(k for k in full if tp_split_dim(k) == 1)
        assert split_weights(full, tp)[0][key].shape[1] * tp == full[key].shape[1]


def test_cli_writes_safetensors_pt_and_info(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    main(["--load_dir", str(tmp_path / "ckpt"), "--save_dir", str(tmp_path / "out"), "--ema"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "convert_info.json", "model_ema.pt", "model_ema.safetensors"]
    assert_same(load_weights(tmp_path / "out" / "model_ema.safetensors"), ema)
    flat = torch.load(tmp_path / "out" / "model_ema.pt")  # the release layout: a flat dict of tensors
    assert_same(flat, ema)
    info = json.loads((tmp_path / "out" / "convert_info.json").read_text())
    assert (info["iteration"], info["tp_size"], info["ema"]) == (20, 2, True)
    assert info["source"].endswith("iter_0000020")

    main(["--load_dir", str(tmp_path / "ckpt" / "iter_0000020"), "--save_dir", str(tmp_path / "pt"),
          "--format", "pt"])
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["convert_info.json", "model.pt"]
    assert_same(torch.load(tmp_path / "pt" / "model.pt"), full)


def test_iteration_flag_picks_an_older_checkpoint(tmp_path, full, ema):
    write_training_checkpoint(tmp_path, full, ema, 2, iteration=10)
    write_training_checkpoint(tmp_path, ema, full, 2, iteration=20)
    assert_same(merge_checkpoint(tmp_path).state_dict, ema)
    assert_same(merge_checkpoint(tmp_path, iteration=10).state_dict, full)


@pytest.mark.parametrize("wrapper", [None, "ema_state_dict", "model", "state_dict"])
def test_released_file_layouts_load(tmp_path, full, wrapper):
    state = {**full, "proj_out._extra_state": None}
    atomic_save(state if wrapper is None else {wrapper: state}, tmp_path / "model_ema.pt")
    assert_same(load_weights(tmp_path / "model_ema.pt"), full)


def test_target_tp_resplits_training_checkpoint_and_merged_file(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "tp2", full, ema, 2)
    main(["--load_dir", str(tmp_path / "tp2"), "--save_dir", str(tmp_path / "tp4"), "--target-tp", "4"])
    assert read_tracker(tmp_path / "tp4") == 20
    assert merge_checkpoint(tmp_path / "tp4").tp_size == 4
    assert_same(merge_checkpoint(tmp_path / "tp4").state_dict, full)
    assert_same(merge_checkpoint(tmp_path / "tp4", ema=True).state_dict, ema)

    main(["--load_dir", str(tmp_path / "tp2"), "--save_dir", str(tmp_path / "merged"), "--ema",
          "--format", "safetensors"])
    main(["--load_dir", str(tmp_path / "merged" / "model_ema.safetensors"), "--save_dir", str(tmp_path / "tp1"),
          "--target-tp", "1"])
    assert read_tracker(tmp_path / "tp1") == 20  # from convert_info.json
    assert_same(merge_checkpoint(tmp_path / "tp1").state_dict, ema)


def test_resplit_checkpoint_resumes_with_load_checkpoint(tmp_path, full):
    """The split layout is what `load_checkpoint` reads (TP=1 here; TP>1 in the distributed test)."""
    from mindspeed_mm_osp.checkpoint import load_checkpoint

    save_split_checkpoint(full, tmp_path, 1, 5)
    torch.manual_seed(3)
    model = SparseUMMDiT(tiny_predictor_config())
    loaded = load_checkpoint(tmp_path, model, finetune=True)
    assert loaded.iteration == 0
    assert_same(local_state_dict(model), full)


def test_merged_file_loads_into_a_model(tmp_path, full):
    save_split_checkpoint(full, tmp_path / "ckpt", 2, 1)
    main(["--load_dir", str(tmp_path / "ckpt"), "--save_dir", str(tmp_path / "out"), "--format", "safetensors"])
    model = SparseUMMDiT(tiny_predictor_config())
    load_merged_state_dict(model, load_weights(tmp_path / "out" / "model.safetensors"))
    assert_same(local_state_dict(model), full)


def test_i2v_checkpoint_merges_splits_and_loads(tmp_path, full):
    """The inpaint variant's wider patch_embed (replicated) goes through the converter unchanged."""
    cfg = from_dict(PredictorConfig, {**TINY_PREDICTOR, "model_id": "SparseUMMDiTInpaint", "vae_scale_factor_t": 2})
    torch.manual_seed(0)
    i2v = local_state_dict(SparseUMMDiT(cfg))
    assert i2v["patch_embed.proj.weight"].shape[1] == 10
    write_training_checkpoint(tmp_path / "ckpt", i2v, i2v, 2)
    main(["--load_dir", str(tmp_path / "ckpt"), "--save_dir", str(tmp_path / "out"), "--format", "safetensors"])
    main(["--load_dir", str(tmp_path / "out" / "model.safetensors"), "--save_dir", str(tmp_path / "tp4"),
          "--target-tp", "4"])
    assert_same(merge_checkpoint(tmp_path / "tp4").state_dict, i2v)
    model = SparseUMMDiT(cfg)
    load_merged_state_dict(model, load_weights(tmp_path / "out" / "model.safetensors"))
    assert_same(local_state_dict(model), i2v)


# ---------------------------------------------------------------------------------------------- failures


def _fails(tmp_path, match, *extra):
    with pytest.raises(SystemExit, match=match):
        main(["--load_dir", str(tmp_path / "ckpt"), "--save_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_rank_folder(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 4)
    shutil.rmtree(tmp_path / "ckpt" / "iter_0000020" / "mp_rank_02")
    _fails(tmp_path, r"mp_rank_02.*missing")


def test_missing_rank_file(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    (tmp_path / "ckpt" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    _fails(tmp_path, r"mp_rank_01.*missing")


def test_mismatched_shapes_name_rank_key_and_file(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    path = tmp_path / "ckpt" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    key = next(k for k in state["model"] if tp_split_dim(k) == 0)
    state["model"][key] = state["model"][key][:-1]
    torch.save(state, path)
    _fails(tmp_path, rf"mp_rank_01.*{key}.*TP rank 1")


def test_missing_key_on_one_rank(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    path = tmp_path / "ckpt" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"].pop("proj_out.bias")
    torch.save(state, path)
    _fails(tmp_path, r"mp_rank_01.*key set differs.*proj_out.bias")


def test_diverged_replicated_tensor(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    path = tmp_path / "ckpt" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["proj_out.weight"] += 1e-3
    torch.save(state, path)
    _fails(tmp_path, r"replicated key proj_out.weight differs")


def test_unknown_layouts(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    (tmp_path / "ckpt" / "iter_0000020" / "mp_rank_00_001").mkdir()
    _fails(tmp_path, r"unknown checkpoint layout.*mp_rank_00_001")
    (tmp_path / "ckpt" / "iter_0000020" / "mp_rank_00_001").rmdir()
    torch.save({"weights": {}}, tmp_path / "ckpt" / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt")
    _fails(tmp_path, r"unknown layout.*no 'model'")
    shutil.rmtree(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    _fails(tmp_path, r"no latest_checkpointed_iteration.txt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_weights(tmp_path / "list.pt")


def test_ema_missing(tmp_path, full):
    save_split_checkpoint(full, tmp_path / "ckpt", 2, 3)
    (tmp_path / "ckpt" / "iter_0000003" / "manifest.json").unlink()  # files edited below
    for rank in range(2):
        path = tmp_path / "ckpt" / "iter_0000003" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        del state["ema_model"]
        torch.save(state, path)
    _fails(tmp_path, r"no 'ema_model' entry", "--ema")


def test_target_tp_not_dividing_heads(tmp_path, full, ema):
    write_training_checkpoint(tmp_path / "ckpt", full, ema, 2)
    _fails(tmp_path, r"cannot split into TP=3", "--target-tp", "3")


def test_unwritable_output_is_a_clear_error_not_a_traceback(tmp_path, full, ema):
    """A disk or permission error while writing exits with a message naming the folder, not a traceback."""
    load = write_training_checkpoint(tmp_path / "ckpt", full, ema, tp=2)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(SystemExit) as exit_info:
        main(["--load_dir", str(load), "--save_dir", str(blocker / "out"), "--ema"])
    assert str(exit_info.value.code).startswith(f"error: writing to {blocker / 'out'} failed")
