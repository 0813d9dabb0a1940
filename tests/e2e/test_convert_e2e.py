"""End to end: a real TP=2 pretrain run -> convert_mm_to_ckpt.py (model / --ema / --target-tp) -> TP=2 inference
through the torchrun launcher with the converted EMA weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import merge_checkpoint
from mindspeed_mm_osp.checkpoint.reader import load_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd, cwd, env=None, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """cwd with demo_out/{models,data} and a TP=2 checkpoint after 4 optimizer steps in demo_out/ckpt."""
    cwd = tmp_path_factory.mktemp("e2e_convert")
    py = str(BIN / "python")
    _run([py, "-m", "mindspeed_mm_osp.tools.make_tiny_models", "demo_out/models"], cwd)
    _run([py, "-m", "mindspeed_mm_osp.tools.make_synthetic_dataset", "demo_out/data"], cwd)
    _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "pretrain.py"),
          "--mm-data", str(REPO / "examples/tiny/data.json"), "--mm-model", str(REPO / "examples/tiny/model.json"),
          "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "4", "--lr", "1e-4",
          "--save", "demo_out/ckpt", "--save-interval", "2", "--use-distributed-optimizer"], cwd)
    return cwd


def test_convert_model_and_ema(trained):
    ckpt = trained / "demo_out/ckpt"
    py = str(BIN / "python")
    _run([py, str(REPO / "convert_mm_to_ckpt.py"), "--load_dir", str(ckpt), "--save_dir", "merged"], trained)
    _run([py, str(REPO / "convert_mm_to_ckpt.py"), "--load_dir", str(ckpt), "--save_dir", "merged", "--ema"],
         trained)
    model = load_weights(trained / "merged/model.safetensors")
    ema = load_weights(trained / "merged/model_ema.safetensors")
    info = json.loads((trained / "merged/convert_info.json").read_text())
    assert (info["iteration"], info["tp_size"], info["ema"]) == (4, 2, True)
    assert model.keys() == ema.keys() and all(v.dtype == torch.float32 for v in ema.values())
    # After 4 steps the EMA lags the weights; it is exactly what the optimizer saved as `ema_model` per rank.
    assert any(not torch.equal(model[k], ema[k]) for k in model)
    shards = [torch.load(ckpt / f"iter_0000004/mp_rank_{r:02d}/model_optim_rng.pt", weights_only=False)
              for r in range(2)]
    key = "transformer_blocks.0.0.attn1.to_q.weight"
    assert torch.equal(ema[key], torch.cat([s["ema_model"][key] for s in shards]))
    assert not torch.equal(merge_checkpoint(ckpt, iteration=2, ema=True).state_dict[key], ema[key])

    # Re-split for a TP=1 run and merge back: same weights.
    _run([py, str(REPO / "convert_mm_to_ckpt.py"), "--load_dir", str(ckpt), "--save_dir", "tp1",
          "--target-tp", "1"], trained)
    back = merge_checkpoint(trained / "tp1")
    assert back.tp_size == 1 and all(torch.equal(back.state_dict[k], model[k]) for k in model)


def test_tp2_launcher_inference_with_converted_ema(trained):
    if not (trained / "merged/model_ema.safetensors").exists():
        _run([str(BIN / "python"), str(REPO / "convert_mm_to_ckpt.py"), "--load_dir", "demo_out/ckpt",
              "--save_dir", "merged", "--ema"], trained)
    cfg = json.loads((REPO / "examples/tiny/inference.json").read_text())
    cfg["predictor"]["from_pretrained"] = "./merged/model_ema.safetensors"
    cfg["diffusion"]["num_inference_steps"] = 2
    (trained / "inference.json").write_text(json.dumps(cfg))
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "TP": "2", "NPUS_PER_NODE": "2", "CONFIG": "inference.json",
           "MASTER_PORT": str(29600 + os.getpid() % 1000), "PYTHONPATH": str(REPO)}
    _run(["bash", str(REPO / "examples/opensoraplan1.5/inference_t2v_1_5.sh"), "--prompt", "a red fox",
          "--save-path", "samples"], trained, env=env)
    from mindspeed_mm_osp.inference.video_io import read_mp4

    frames, fps = read_mp4(trained / "samples/000000.mp4")
    assert frames.shape == (17, 64, 128, 3) and fps == 8
    record = json.loads((trained / "samples/000000.json").read_text())
    assert record["tensor_model_parallel_size"] == 2 and record["seed"] == 1235
