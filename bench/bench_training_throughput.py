"""Training throughput of SparseUMMDiT: achieved TFLOP/s and MFU from the analytic FLOP count.

The same count (`training/flops.py`, attention per skiparse group) feeds the training log's
`throughput per device` and `MFU`. Peak: the accelerator's bf16 dense peak, or on CPU a
matmul measured in this run. Default shape: the tiny CPU model at 17x64x128 frames (latent
3x8x16); `--release-slice` runs a 2-stage slice of the release width (GPU).

    python bench/bench_training_throughput.py --quick
    python bench/bench_training_throughput.py --release-slice --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from mindspeed_mm_osp import platform
from mindspeed_mm_osp.config import load_model_config
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.training.flops import peak_flops_per_second, predictor_training_flops

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(cfg, latent_thw, text_len, batch, dtype, steps, warmup) -> dict:
    device = platform.device()
    with device:  # initialised where it runs: a CPU init of the release-width slice takes longer than its steps
        model = SparseUMMDiT(cfg, params_dtype=dtype)
    t, h, w = latent_thw
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, t, h, w, generator=g).to(device, dtype)
    text = torch.randn(batch, text_len, cfg.caption_channels, generator=g).to(device, dtype)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype)
    timestep = torch.full((batch,), 500.0, device=device)
    times = []
    for i in range(warmup + steps):
        platform.synchronize()
        start = time.perf_counter()
        out = model(x, timestep, text, pooled_projections=pooled)
        out.float().square().mean().backward()
        platform.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    step = sorted(times)[len(times) // 2]
    flops = predictor_training_flops(cfg, batch, latent_thw, text_len)
    return {"step_s": step, "model_tflop_per_step": flops / 1e12, "tflops": flops / step / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--release-slice", action="store_true", help="2-stage slice of the release width (D=3072)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--latent", type=int, nargs=3, default=None, help="latent T H W")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.release_slice:
        release = load_model_config(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json").predictor
        cfg = dataclasses.replace(release, num_layers=(2, 2, 2), sparse_n=(1, 2, 1))
        # a 57x288x512 video (frames x height x width) is a latent of 8x36x64 after the 8x8x8 WF-VAE
        latent, text_len = tuple(a.latent or (8, 36, 64)), 512
    else:
        cfg = load_model_config(ROOT / "examples/tiny/model.json").predictor
        latent, text_len = tuple(a.latent or (3, 8, 16)), 32
    steps, warmup = (3, 1) if a.quick else (10, 2)
    peak = peak_flops_per_second()
    r = measure(cfg, latent, text_len, 1, DTYPES[a.dtype], steps, warmup)
    r.update(device=platform.device_name(), accelerator=platform.accelerator(), dtype=a.dtype, latent=latent,
             peak_tflops=peak / 1e12, mfu=r["tflops"] * 1e12 / peak)
    print(f"{'device':<12}{'dtype':<7}{'latent':<14}{'step (ms)':>10}{'TFLOP/step':>12}{'TFLOP/s':>10}"
          f"{'peak':>10}{'MFU':>8}")
    print(f"{r['accelerator']:<12}{a.dtype:<7}{'x'.join(map(str, latent)):<14}{1000 * r['step_s']:>10.1f}"
          f"{r['model_tflop_per_step']:>12.4f}{r['tflops']:>10.3f}{r['peak_tflops']:>10.3f}{100 * r['mfu']:>7.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    main()
