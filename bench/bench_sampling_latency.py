"""Seconds per video on one device: a release-size request timed stage by stage, then added up per sampler.

Random weights take the time real ones do, so nothing is downloaded: the release SparseUMMDiT (8.5B), the
release WF-VAE and T5-XL / CLIP-bigG text encoders of the release sizes are built on the device in bf16. For a
121x576x1024 request (latent 32x16x72x128) with 512 T5 tokens it times

* one denoising step with batched CFG ([uncond; cond] in one forward), eager and, with `--compile`, with the
  blocks compiled (`inference.compile`);
* one step with the CFG folded in (batch 1, as a guidance-distilled student runs);
* one step-cache step that skips the blocks (embeddings, first modulation and head only);
* the VAE decode of the whole latent, tiled in time as inference does; the T5 and CLIP encoders separately;

and reports seconds per video for 50 CFG steps, 50 CFG steps with the step cache at the documented threshold
(its skipped fraction measured in this run: 50 cached steps on the same model and sigma schedule, on a smaller
latent so that it fits the budget), 4 and 8 student steps, each plus decode, plus the text encoders; and the
peak device memory of every stage. The step time also gives the achieved model TFLOP/s (`training/flops.py`
count), from which docs/inference_acceleration.md predicts other sizes, step counts and TP.

    python bench/bench_sampling_latency.py --compile --json lat.json   # on a GPU (~2 min on one H200)
    python bench/bench_sampling_latency.py --quick                     # tiny models on CPU, same table (~10 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from _timing import median_seconds
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.config import DiffusionConfig, from_dict, load_model_config
from mindspeed_mm_osp.config.ae import AEConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, sample
from mindspeed_mm_osp.diffusion.step_cache import StepCache
from mindspeed_mm_osp.inference.compile import compile_blocks
from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.models.text import TextEncoders
from mindspeed_mm_osp.training.flops import predictor_forward_flops

ROOT = Path(__file__).resolve().parents[1]
CACHE_THRESHOLD = 0.05  # docs/inference_acceleration.md: the step cache's documented working threshold
SAMPLER = dict(shift=7.0, guidance_scale=8.0, guidance_rescale=0.7)  # the release inference JSON's settings
CFG_STEPS, STUDENT_STEPS = 50, (4, 8)

# T5 v1.1 XL and CLIP-bigG text tower sizes (what the release configs load); tiny ones for --quick.
RELEASE = dict(model=ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json", video=(121, 576, 1024),
               text_tokens=512, dtype=torch.bfloat16, cache_latent=(16, 12, 24), ae=None,
               t5=dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
               clip=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, projection_dim=1280))
QUICK = dict(model=ROOT / "examples/tiny/model.json", video=(17, 64, 128), text_tokens=32, dtype=torch.float32,
             cache_latent=None, ae=tiny_ae_config_dict(),
             t5=dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
             clip=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=16, bos_token_id=126, eos_token_id=127))


class Stages:
    """Timed stages in run order, with each stage's peak device memory; the JSON is rewritten after every
    stage, so a run cut short by its time limit still leaves what it measured."""

    def __init__(self, json_path: Optional[str], budget_s: float, meta: dict) -> None:
        self.json_path, self.deadline, self.meta = json_path, time.perf_counter() + budget_s, meta
        self.rows: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        platform.synchronize()
        platform.reset_peak_memory_stats()
        row = fn()
        row["peak_gib"] = platform.max_memory_allocated() / 2 ** 30
        self.rows[name] = row
        print(json.dumps({"stage": name, **row}), flush=True)
        steps_timed = {"cfg_step", "folded_step", "cached_skip_step"} <= self.rows.keys()
        self.save(**({"per_video": per_video(self.rows)} if steps_timed else {}))
        return row

    def save(self, **extra) -> None:
        self.meta.update(extra)
        if self.json_path:
            Path(self.json_path).write_text(json.dumps({**self.meta, "stages": self.rows}, indent=1, default=str))


def build_predictor(cfg, dtype: torch.dtype) -> SparseUMMDiT:
    """Random weights created on the device in `dtype` (a CPU init of 8.5B parameters takes minutes)."""
    torch.manual_seed(0)
    with platform.device():
        return SparseUMMDiT(cfg, params_dtype=dtype).eval().requires_grad_(False)


def build_text_encoders(preset: dict, dtype: torch.dtype) -> TextEncoders:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    with platform.device():
        t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **preset["t5"]))
        clip = CLIPTextModelWithProjection(CLIPTextConfig(max_position_embeddings=77, **preset["clip"]))
    return TextEncoders(t5.to(dtype), clip.to(dtype))


def conditioning(cfg, batch: int, text_tokens: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g, dev = torch.Generator().manual_seed(1), platform.device()
    return {"encoder_hidden_states": torch.randn(batch, text_tokens, cfg.caption_channels, generator=g).to(dev, dtype),
            "encoder_attention_mask": torch.ones(batch, text_tokens, dtype=torch.long, device=dev),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dev, dtype)}


def sampler(predictor, dtype: torch.dtype, cond: dict, latent: tuple, sigmas: torch.Tensor,
            guided: bool) -> Callable[[], torch.Tensor]:
    """A call that runs `diffusion.sample` over `sigmas` (its steps), with the batched CFG or without it (folded).

    Latents stay fp32 between steps and the predictor (a model or a `StepCache`) runs in `dtype`, as inference.
    """
    noise = torch.randn(1, *latent, generator=torch.Generator().manual_seed(2)).to(platform.device())
    uncond = {k: v[:1] for k, v in cond.items()} if guided else None
    positive = {k: v[-1:] for k, v in cond.items()}

    def model_fn(x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        return predictor(x.to(dtype), timestep, **kwargs).float()

    return lambda: sample(model_fn, noise, positive, uncond, sigmas=sigmas, guidance_scale=SAMPLER["guidance_scale"],
                          guidance_rescale=SAMPLER["guidance_rescale"])


def time_denoising(stages: Stages, model: SparseUMMDiT, dtype: torch.dtype, cond: dict, latent: tuple,
                   sigmas: torch.Tensor, iters: int) -> None:
    one_step = sigmas[:2]
    for name, guided in (("cfg_step", True), ("folded_step", False)):
        step = sampler(model, dtype, cond, latent, one_step, guided)
        stages.run(name, lambda: {"seconds": median_seconds(step, iters)})

    def skipped_step() -> dict:  # a cache that never recomputes after its first call: every later call skips
        cache = StepCache(model, float("inf"), num_steps=10 ** 9)
        step = sampler(cache, dtype, cond, latent, one_step, True)
        seconds = median_seconds(step, iters)
        assert len(cache.skipped) == cache.step - 1, "every call after the first should have skipped the blocks"
        return {"seconds": seconds}

    stages.run("cached_skip_step", skipped_step)


def measure_skip_fraction(stages: Stages, model: SparseUMMDiT, dtype: torch.dtype, cond: dict, latent: tuple,
                          sigmas: torch.Tensor) -> None:
    def run() -> dict:
        cache = StepCache(model, CACHE_THRESHOLD, num_steps=CFG_STEPS)
        start = time.perf_counter()
        sampler(cache, dtype, cond, latent, sigmas, True)()
        platform.synchronize()
        return {"threshold": CACHE_THRESHOLD, "skipped_fraction": cache.skipped_fraction, "latent": latent,
                "steps": CFG_STEPS, "seconds": time.perf_counter() - start}

    stages.run("step_cache_run", run)


def time_text_and_decode(stages: Stages, preset: dict, cfg, latent: tuple, iters: int) -> None:
    dtype, dev = preset["dtype"], platform.device()
    encoders = build_text_encoders(preset, dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, preset["t5"]["vocab_size"], (2, preset["text_tokens"]), generator=g).to(dev)
    ids_2 = torch.randint(0, preset["clip"]["vocab_size"] - 2, (2, 77), generator=g)
    ids_2[:, -1] = preset["clip"]["vocab_size"] - 1  # the end token, whose state CLIP pools (both configs' last id)
    ids_2 = ids_2.to(dev)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def encode() -> dict:
        t5 = median_seconds(lambda: encoders.t5(input_ids=ids, attention_mask=mask), iters)
        clip = median_seconds(lambda: encoders.clip(input_ids=ids_2), iters)
        return {"t5_seconds": t5, "clip_seconds": clip, "seconds": t5 + clip, "prompts": 2}

    stages.run("text_encoders", encode)
    del encoders
    platform.empty_cache()
    ae_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    ae = from_dict(AEConfig, preset["ae"], path="ae") if preset["ae"] else cfg.ae
    vae = VideoAutoencoder(dataclasses.replace(ae, from_pretrained=None, dtype=ae_dtype)).to(dev)
    z = torch.randn(1, *latent, generator=g).to(dev)
    tile = vae.config.tile_latent_frames if vae.config.use_tiling else latent[1]
    vae.decode(z[:, :, : tile + 1])  # warm-up on one tile (kernel selection), then the whole latent once
    stages.run("vae_decode", lambda: {"seconds": median_seconds(lambda: vae.decode(z), 1, warmup=0),
                                      "tile_latent_frames": tile})
    del vae
    platform.empty_cache()


def time_compiled(stages: Stages, model: SparseUMMDiT, dtype: torch.dtype, cond: dict, latent: tuple,
                  sigmas: torch.Tensor, iters: int) -> None:
    """Last (the compiled wrappers stay on the model). The first call compiles every block; an alarm at the
    budget's end stops a compile that would outlast it, and the stage then records how long it was given."""
    compile_blocks(model, "default")
    step = sampler(model, dtype, cond, latent, sigmas[:2], True)
    given, expired = max(1, int(stages.left())), []

    def run() -> dict:
        start = time.perf_counter()
        try:
            step()
            platform.synchronize()
        except Exception:  # dynamo wraps the alarm's error in its own
            if not expired:
                raise
        if expired:  # also when a block's compile swallowed the error and ran eagerly
            return {"first_call_unfinished_after_s": given}
        first = time.perf_counter() - start
        return {"seconds": median_seconds(step, iters, warmup=0), "first_call_seconds": first, "mode": "default"}

    def on_alarm(signum, frame):
        expired.append(signum)
        raise TimeoutError(f"compile unfinished after {given} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(given)
    try:
        stages.run("cfg_step_compiled", run)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def per_video(rows: dict) -> list[dict]:
    """Seconds per video for each sampler: denoising, + decode, + text encoders."""
    cfg_s, fold_s, skip_s = (rows[k]["seconds"] for k in ("cfg_step", "folded_step", "cached_skip_step"))
    fraction = rows.get("step_cache_run", {}).get("skipped_fraction")
    out = [(f"{CFG_STEPS} steps, batched CFG", CFG_STEPS * cfg_s)]
    if fraction is not None:
        cached = CFG_STEPS * ((1 - fraction) * cfg_s + fraction * skip_s)
        out.append((f"{CFG_STEPS} steps, CFG, step cache {CACHE_THRESHOLD} ({fraction:.0%} skipped)", cached))
    if "seconds" in rows.get("cfg_step_compiled", {}):
        out.append((f"{CFG_STEPS} steps, CFG, compiled blocks", CFG_STEPS * rows["cfg_step_compiled"]["seconds"]))
    out += [(f"{n} student steps (CFG folded)", n * fold_s) for n in STUDENT_STEPS]
    decode = rows.get("vae_decode", {}).get("seconds", float("nan"))
    text = rows.get("text_encoders", {}).get("seconds", float("nan"))
    return [{"sampler": name, "denoise_s": s, "with_decode_s": s + decode, "total_s": s + decode + text}
            for name, s in out]


def print_tables(meta: dict, rows: dict, videos: list[dict]) -> None:
    print(f"\n{meta['preset']} on {meta['device']} ({meta['dtype']}): request {'x'.join(map(str, meta['video']))}, "
          f"latent {'x'.join(map(str, meta['latent']))}, {meta['text_tokens']} text tokens")
    print(f"{'stage':<20} {'seconds':>9} {'peak GiB':>9}  notes")
    for name, r in rows.items():
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("seconds", "peak_gib"))
        print(f"{name:<20} {r.get('seconds', float('nan')):9.3f} {r['peak_gib']:9.2f}  {notes}")
    print(f"\n{'seconds per video':<52} {'denoise':>9} {'+ decode':>9} {'+ text':>9}")
    for v in videos:
        print(f"{v['sampler']:<52} {v['denoise_s']:9.2f} {v['with_decode_s']:9.2f} {v['total_s']:9.2f}")
    device_peak = f"{meta['peak_gib']:.2f} GiB" if meta["accelerator"] != "cpu" else "n/a (CPU)"
    print(f"peak device memory: {device_peak}; process peak RSS: {meta['peak_rss_gib']:.2f} GiB; "
          f"CFG step: {meta['cfg_step_tflop']:.4g} model TFLOP at {meta['cfg_step_tflops']:.4g} TFLOP/s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models on CPU (CI): the same stages and tables")
    p.add_argument("--compile", action="store_true", help="also time the CFG step with compiled blocks (last)")
    p.add_argument("--json", help="write the stages and the seconds-per-video rows here")
    p.add_argument("--budget-s", type=float, default=110.0,
                   help="skip the optional stages (step-cache run, compile) that would start with less left")
    p.add_argument("--iters", type=int, default=3, help="timed repeats per step after one warm-up (median)")
    a = p.parse_args()
    if not a.quick and platform.accelerator() == "cpu":
        p.exit(2, "bench_sampling_latency.py: the release size needs an accelerator (it would take hours on "
                  "CPU); pass --quick for the tiny CPU run\n")
    return a


def main() -> None:
    a = parse_args()
    preset = QUICK if a.quick else RELEASE
    if a.quick:
        torch.set_num_threads(1)
    model_cfg = load_model_config(preset["model"])
    cfg, frames_hw = model_cfg.predictor, preset["video"]
    ft, fh, fw = model_cfg.ae.vae_scale_factor
    latent = (cfg.in_channels, (frames_hw[0] - 1) // ft + 1, frames_hw[1] // fh, frames_hw[2] // fw)
    flops = predictor_forward_flops(cfg, 2, latent[1:], preset["text_tokens"])
    stages = Stages(a.json, a.budget_s, {
        "preset": "quick" if a.quick else "release", "device": platform.device_name(),
        "accelerator": platform.accelerator(), "torch": torch.__version__, "dtype": str(preset["dtype"]),
        "video": frames_hw, "latent": latent, "text_tokens": preset["text_tokens"], "sampler": SAMPLER})
    diffusion = DiffusionConfig(shift=SAMPLER["shift"], use_dynamic_shifting=False)
    sigmas = FlowMatchingScheduler(diffusion).sampling_sigmas(CFG_STEPS)
    dtype = preset["dtype"]
    model = build_predictor(cfg, dtype)
    cond = conditioning(cfg, 2, preset["text_tokens"], dtype)
    time_denoising(stages, model, dtype, cond, latent, sigmas, a.iters)
    if stages.left() > 30 or a.quick:  # the skipped fraction on a smaller latent, same sigmas
        measure_skip_fraction(stages, model, dtype, cond, (latent[0], *(preset["cache_latent"] or latent[1:])), sigmas)
    time_text_and_decode(stages, preset, model_cfg, latent, a.iters)
    if a.compile:
        time_compiled(stages, model, dtype, cond, latent, sigmas, a.iters)
    rows = stages.rows
    videos = per_video(rows)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    stages.save(per_video=videos, peak_gib=max(r["peak_gib"] for r in rows.values()), peak_rss_gib=peak_rss,
                cfg_step_tflop=flops / 1e12, cfg_step_tflops=flops / rows["cfg_step"]["seconds"] / 1e12)
    print_tables(stages.meta, rows, videos)


if __name__ == "__main__":
    main()
