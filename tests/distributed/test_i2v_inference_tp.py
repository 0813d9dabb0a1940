"""Image-to-video sampling at TP=2 + SP and with CFG-parallel equals TP=1: every rank builds the same condition."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import load_latents
from mindspeed_mm_osp.testing import run_distributed
from helpers import infer_on_rank, make_tiny_inference


def test_i2v_tp2_and_cfg_parallel_equal_tp1(tmp_path):
    config = make_tiny_inference(tmp_path / "setup", model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8)
    y, x = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 60), indexing="ij")
    Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(tmp_path / "first.png")
    base = ["--config", str(config), "--save-latents", "--image", str(tmp_path / "first.png")]
    cli.main([*base, "--save-path", str(tmp_path / "tp1")])
    run_distributed(infer_on_rank, 2, [*base, "--tensor-model-parallel-size", "2", "--save-path",
                                       str(tmp_path / "tp2")], tp=2, timeout=300)
    run_distributed(infer_on_rank, 2, [*base, "--cfg-parallel", "--save-path", str(tmp_path / "cfg")],
                    tp=1, timeout=300)
    for stem in ("000000", "000001"):
        ref = load_latents(tmp_path / "tp1" / f"{stem}.safetensors").latents
        for other in ("tp2", "cfg"):
            torch.testing.assert_close(load_latents(tmp_path / other / f"{stem}.safetensors").latents, ref,
                                       rtol=1e-4, atol=1e-4)
