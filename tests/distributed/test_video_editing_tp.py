"""Video editing (`--video --strength`) at TP=2 + SP, and with CFG-parallel and the step cache, equals one process:
every rank encodes the same clip and starts from the same noised latents at the same schedule step."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import load_latents
from mindspeed_mm_osp.inference.video_io import write_mp4
from mindspeed_mm_osp.testing import run_distributed
from helpers import infer_on_rank, make_tiny_inference, smooth_frames

pytestmark = pytest.mark.slow  # two 2-rank launches, ~45 s on 2 cores


def test_editing_at_tp2_and_with_cfg_parallel_and_step_cache_equals_one_process(tmp_path):
    config = make_tiny_inference(tmp_path / "setup")
    write_mp4(tmp_path / "clip.mp4", smooth_frames(10, 40, 64), 24)
    base = ["--config", str(config), "--save-latents", "--num-inference-steps", "8", "--video",
            str(tmp_path / "clip.mp4"), "--strength", "0.5"]
    cached = ["--cache-threshold", "0.3"]  # steps 4..7 run; a threshold that skips some of 5 and 6
    cli.main([*base, "--save-path", str(tmp_path / "tp1")])
    cli.main([*base, *cached, "--save-path", str(tmp_path / "cache1")])
    run_distributed(infer_on_rank, 2, [*base, "--tensor-model-parallel-size", "2", "--save-path",
                                       str(tmp_path / "tp2")], tp=2, timeout=300)
    run_distributed(infer_on_rank, 2, [*base, *cached, "--cfg-parallel", "--save-path", str(tmp_path / "cfg")],
                    tp=1, timeout=300)
    for stem in ("000000", "000001"):
        ref, cache = (load_latents(tmp_path / name / f"{stem}.safetensors") for name in ("tp1", "cache1"))
        assert ref.record["edit"]["start_step"] == 4 and not torch.equal(cache.latents, ref.latents)
        tp2 = load_latents(tmp_path / "tp2" / f"{stem}.safetensors")
        torch.testing.assert_close(tp2.latents, ref.latents, rtol=1e-5, atol=1e-5)
        cfg = load_latents(tmp_path / "cfg" / f"{stem}.safetensors")
        torch.testing.assert_close(cfg.latents, cache.latents, rtol=1e-5, atol=1e-5)
