"""What image-to-video conditioning costs per training micro-batch (tiny models of examples/tiny, 17x64x128 clip).

    python bench/bench_i2v.py [--quick] [--iters N]

Side by side in one run, medians of process CPU time (one thread; other processes competing for the cores do not
inflate it):
* encoding: the clip alone (text-to-video) vs the clip and its masked copy in ONE VAE call (what training does)
  vs two separate calls (what the reference does);
* predictor forward + backward: the T2V model (4 input channels) vs the inpaint model (2*4+8 = 16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import statistics
import time

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_cpu_seconds(step, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args()
    iters = args.iters or (3 if args.quick else 10)
    torch.set_num_threads(1)
    from mindspeed_mm_osp.config import AEConfig, PredictorConfig, from_dict
    from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, compress_mask, inpaint_input, masked_video

    torch.manual_seed(0)
    vae = VideoAutoencoder(from_dict(AEConfig, tiny_ae_config_dict()))
    video = torch.rand(1, 3, 17, 64, 128) * 2 - 1
    mask = torch.ones(1, 17)
    mask[0, 0] = 0
    masked = masked_video(video, mask)
    enc = {
        "clip only (T2V)": lambda: vae.encode_posterior(video),
        "clip + masked, one call": lambda: vae.encode_posterior(torch.cat([video, masked])),
        "clip, masked: two calls": lambda: (vae.encode_posterior(video), vae.encode_posterior(masked)),
    }
    results = {name: median_cpu_seconds(fn, iters) for name, fn in enc.items()}

    predictor = json.loads((ROOT / "examples/tiny/model.json").read_text())["predictor"]
    x = torch.randn(1, 4, 3, 8, 16)
    text, pooled = torch.randn(1, 32, 32), torch.randn(1, 16)
    cond = inpaint_input(x, torch.randn_like(x), compress_mask(mask, 8, 8, 16))
    for name, model_id, inp in (("predictor fwd+bwd T2V", "SparseUMMDiT", x),
                                ("predictor fwd+bwd I2V", "SparseUMMDiTInpaint", cond)):
        model = SparseUMMDiT(from_dict(PredictorConfig, {**predictor, "model_id": model_id})).train()
        results[name] = median_cpu_seconds(
            lambda: model(inp, torch.tensor([500.0]), text, pooled_projections=pooled).square().mean().backward(), iters)
    base = results["clip only (T2V)"]
    for name, sec in results.items():
        ref = base if "predictor" not in name else results["predictor fwd+bwd T2V"]
        print(f"{name:>28}: {1000 * sec:8.1f} ms  ({sec / ref:.2f}x)")
    print(f"one call vs two calls: {results['clip, masked: two calls'] / results['clip + masked, one call']:.2f}x")


if __name__ == "__main__":
    main()
