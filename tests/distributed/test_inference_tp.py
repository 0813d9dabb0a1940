"""TP=2 checkpoints merge to the TP=1 layout; TP=2 (and DP=2) inference equals TP=1 from the same merged weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint import save_checkpoint
from mindspeed_mm_osp.checkpoint.convert import merge_checkpoint, split_weights
from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import load_latents
from mindspeed_mm_osp.inference.video_io import read_mp4
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict
from mindspeed_mm_osp.testing import run_distributed, tiny_predictor_config
from helpers import INFERENCE_SIZE, infer_on_rank, make_tiny_inference

SIZE = INFERENCE_SIZE


def _save_tp(rank, world_size, full, root):
    model = SparseUMMDiT(tiny_predictor_config(), sequence_parallel=True)
    load_merged_state_dict(model, full)
    save_checkpoint(root, 0, model, save_optim=False, save_rng=False)
    return local_state_dict(model)


def test_merged_tp2_checkpoint_equals_tp1_model_state(tmp_path):
    torch.manual_seed(0)
    tp1 = local_state_dict(SparseUMMDiT(tiny_predictor_config()))
    shards = run_distributed(_save_tp, 2, tp1, str(tmp_path), tp=2)
    merged = merge_checkpoint(tmp_path)
    assert merged.tp_size == 2 and list(merged.state_dict) == list(tp1)  # same keys, same order
    for key, value in tp1.items():
        assert torch.equal(merged.state_dict[key], value), key
    for rank, shard in enumerate(split_weights(merged.state_dict, 2)):
        assert shard.keys() == shards[rank].keys()
        assert all(torch.equal(shard[k], shards[rank][k]) for k in shard)


# ---------------------------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return make_tiny_inference(tmp_path_factory.mktemp("tiny_inference_tp"))


def test_tp2_and_dp2_inference_equal_tp1(config, tmp_path):
    base = ["--config", str(config), "--save-latents"]
    cli.main([*base, "--save-path", str(tmp_path / "tp1")])
    run_distributed(infer_on_rank, 2, [*base, "--tensor-model-parallel-size", "2", "--save-path",
                                       str(tmp_path / "tp2")], tp=2, timeout=300)
    run_distributed(infer_on_rank, 2, [*base, "--save-path", str(tmp_path / "dp2")], tp=1, timeout=300)
    for stem in ("000000", "000001"):
        ref = load_latents(tmp_path / "tp1" / f"{stem}.safetensors")
        for other in ("tp2", "dp2"):
            got = load_latents(tmp_path / other / f"{stem}.safetensors")
            torch.testing.assert_close(got.latents, ref.latents, rtol=1e-4, atol=1e-4)
        assert load_latents(tmp_path / "tp2" / f"{stem}.safetensors").record["tensor_model_parallel_size"] == 2

    # Decode the TP=2 latents under a TP=2 launch: one writer per file, valid mp4s.
    run_distributed(infer_on_rank, 2, ["--config", str(config), "--decode-latents", str(tmp_path / "tp2"),
                                       "--tensor-model-parallel-size", "2", "--save-path", str(tmp_path / "vid")],
                    tp=2, timeout=300)
    assert sorted(p.name for p in (tmp_path / "vid").iterdir()) == [
        "000000.json", "000000.mp4", "000001.json", "000001.mp4"]
    frames, fps = read_mp4(tmp_path / "vid" / "000001.mp4")
    assert frames.shape == (SIZE[0], SIZE[1], SIZE[2], 3) and fps == 8


def test_cfg_parallel_step_cache_and_parallel_decode_through_the_cli(config, tmp_path):
    """`--cfg-parallel` (2 ranks) with the step cache at threshold 0 gives the single-process latents; the
    record keeps the settings; `--parallel-vae-decode` over a TP=2 replica writes each video once, equal to one
    rank's (exactness of split decodes: tests/unit/test_vae_parallel_decode.py)."""
    base = ["--config", str(config), "--save-latents"]
    cli.main([*base, "--save-path", str(tmp_path / "ref")])
    run_distributed(infer_on_rank, 2, [*base, "--cfg-parallel", "--cache-threshold", "0", "--save-path",
                                       str(tmp_path / "cfg")], tp=1, timeout=300)
    for stem in ("000000", "000001"):
        ref = load_latents(tmp_path / "ref" / f"{stem}.safetensors")
        got = load_latents(tmp_path / "cfg" / f"{stem}.safetensors")
        torch.testing.assert_close(got.latents, ref.latents, rtol=1e-5, atol=1e-5)
        assert got.record["acceleration"]["cfg_parallel"] and got.record["acceleration"]["cache_threshold"] == 0

    decode = ["--config", str(config), "--decode-latents", str(tmp_path / "ref")]
    cli.main([*decode, "--save-path", str(tmp_path / "vid1")])
    run_distributed(infer_on_rank, 2, [*decode, "--parallel-vae-decode", "--tensor-model-parallel-size", "2",
                                       "--save-path", str(tmp_path / "vid2")], tp=2, timeout=300)
    assert sorted(p.name for p in (tmp_path / "vid2").iterdir()) == sorted(p.name for p in (tmp_path / "vid1").iterdir())
    for stem in ("000000", "000001"):  # an exact decode, and the same frames encode to the same file
        assert torch.equal(torch.as_tensor(read_mp4(tmp_path / "vid2" / f"{stem}.mp4")[0]),
                           torch.as_tensor(read_mp4(tmp_path / "vid1" / f"{stem}.mp4")[0]))
    # Generation with both branches of the CFG pair decoding together: one writer, every video present.
    run_distributed(infer_on_rank, 2, ["--config", str(config), "--cfg-parallel", "--parallel-vae-decode",
                                       "--save-path", str(tmp_path / "vid3")], tp=1, timeout=300)
    assert sorted(p.name for p in (tmp_path / "vid3").iterdir()) == sorted(p.name for p in (tmp_path / "vid1").iterdir())
    assert read_mp4(tmp_path / "vid3" / "000001.mp4")[0].shape == (SIZE[0], SIZE[1], SIZE[2], 3)
