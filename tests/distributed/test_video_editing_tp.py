"""Video editing (`--video --strength`) at TP=2 + SP, at CP=2, and with CFG-parallel and the step cache, equals one
process: every rank encodes the same clip and starts from the same noised latents at the same schedule step."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import load_latents
from mindspeed_mm_osp.inference.video_io import write_mp4
from mindspeed_mm_osp.testing import run_distributed
from helpers import infer_on_rank, make_tiny_inference, smooth_frames

pytestmark = pytest.mark.slow  # three 2-rank launches, ~60 s on 2 cores


@pytest.fixture(scope="module")
def edit_setup(tmp_path_factory):
    """The tiny inference JSON and a 10-frame clip to edit."""
    root = tmp_path_factory.mktemp("edit")
    write_mp4(root / "clip.mp4", smooth_frames(10, 40, 64), 24)
    return make_tiny_inference(root / "setup"), root / "clip.mp4"


def edit_argv(setup, strength: float) -> list[str]:
    config, clip = setup
    return ["--config", str(config), "--save-latents", "--num-inference-steps", "8", "--video", str(clip),
            "--strength", str(strength)]


def test_editing_at_tp2_and_with_cfg_parallel_and_step_cache_equals_one_process(edit_setup, tmp_path):
    base = edit_argv(edit_setup, 0.5)
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


def test_editing_at_cp2_equals_one_process(edit_setup, tmp_path):
    base = edit_argv(edit_setup, 0.6)  # steps 3..7 run
    cli.main([*base, "--save-path", str(tmp_path / "cp1")])
    run_distributed(infer_on_rank, 2, [*base, "--context-parallel-size", "2", "--save-path", str(tmp_path / "cp2")],
                    cp=2, timeout=300)
    for stem in ("000000", "000001"):
        ref, cp2 = (load_latents(tmp_path / name / f"{stem}.safetensors") for name in ("cp1", "cp2"))
        assert ref.record["edit"]["start_step"] == 3 and cp2.record["context_parallel_size"] == 2
        assert cp2.record["edit"] == ref.record["edit"]
        torch.testing.assert_close(cp2.latents, ref.latents, rtol=1e-5, atol=1e-5)
