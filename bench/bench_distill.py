"""Few-step students by distillation (docs/distillation.md): how close 4 and 8 student steps get to the teacher's
50-step samples, next to the teacher's own 4 and 8 steps, and the sampling time per video.

Per teacher, two students (K = 4 and K = 8, teacher sub-steps 24/K, guidance 8 and rescale 0.7 folded in, shift 7:
the tiny inference JSON's sampler) are distilled through `pretrain.py`'s trainer (`--distill trajectory`, LoRA),
merged with `convert_mm_to_ckpt.py --lora-merge`, then sampled by `inference.py`'s runner on the student's
recorded schedule. The 16 prompts are none of the training captions; prompt i always starts from the noise of seed
42 + i. PSNR is over the decoded videos (uint8 range), per video, averaged; the time is the denoising loop per
video (text encoding and decode excluded), measured in this run for every sampler.

Teachers: `tiny-demo`, the merged EMA weights that examples/tiny/run_demo.sh trains (run it first), and `w256`,
a width-256 predictor (4 heads of 64) with random weights, distilled on the same data. `--quick`: a random tiny
teacher on a throw-away synthetic set, a few iterations and 4 of the prompts (proves the path, not the target).

    python bench/bench_distill.py --json distill.json      # ~15 min on 2 CPU cores
    python bench/bench_distill.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a white square moving over a grey background", "a small bright square sliding to the right",
    "a pale block drifting slowly across a dark field", "a square of light crossing the frame",
    "a grey scene with a white tile moving up", "a white box gliding diagonally", "one white square on grey, moving",
    "a bright patch travelling left", "a moving square seen from above", "a white shape crossing a flat background",
    "a lone square moving steadily", "a light square drifting downwards", "a square slowly moving on a plain wall",
    "white square, grey backdrop, slow motion", "a glowing square moving across the screen",
    "a tiny white tile sliding along the bottom",
]
SEED = 42
STUDENTS = (4, 8)
TEACHER_STEPS = 50
SUBSTEPS_TOTAL = 24  # each student's teacher covers its K steps with 24 / K sub-steps


def _train_rank(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.distill import DistillTrainer

    return DistillTrainer(parse_args(argv, world_size=world_size)).fit().losses


def distill_student(files: dict, steps: int, iters: int, out: Path) -> tuple[Path, list[float]]:
    """A K-step student of `files["teacher"]` trained for `iters` iterations, merged: (weights file, losses)."""
    from mindspeed_mm_osp.checkpoint import convert
    from mindspeed_mm_osp.testing import run_distributed

    ckpt = out / f"student{steps}_ckpt"
    argv = ["--mm-data", str(files["data"]), "--mm-model", str(files["model"]), "--micro-batch-size", "1",
            "--train-iters", str(iters), "--lr", "1e-3", "--lr-warmup-iters", "5", "--weight-decay", "0",
            "--clip-grad", "1.0", "--seed", "1234", "--log-interval", str(max(1, iters // 5)),
            "--load", str(files["teacher"]), "--lora-r", "16", "--lora-alpha", "16", "--save", str(ckpt),
            "--distill", "trajectory", "--distill-student-steps", str(steps),
            "--distill-teacher-substeps", str(SUBSTEPS_TOTAL // steps)]
    losses = run_distributed(_train_rank, 1, argv, timeout=3600)[0]
    merged = out / f"student{steps}"
    convert.main(["--lora-merge", "--load_dir", str(ckpt), "--base", str(files["teacher"]), "--save_dir", str(merged),
                  "--format", "safetensors"])
    return merged / "model.safetensors", losses


def sample_videos(config: Path, weights: Path, prompts: list[str], *flags: str) -> tuple[torch.Tensor, float, dict]:
    """(decoded videos in [-1, 1], seconds of denoising per video, the sampler's record) of the runner."""
    from mindspeed_mm_osp.inference.arguments import parse_args
    from mindspeed_mm_osp.inference.ranks import release_parallel
    from mindspeed_mm_osp.inference.runner import InferenceRunner

    runner = InferenceRunner(parse_args(["--config", str(config), "--predictor-weights", str(weights),
                                         "--seed", str(SEED), *flags]))
    runner.setup()
    try:
        runner.build(decode=True)
        videos, seconds = [], 0.0
        for i, prompt in enumerate(prompts):
            batch = runner.encode_prompt([i], [prompt])
            start = time.perf_counter()
            runner.denoise(batch, progress=False)
            seconds += time.perf_counter() - start
            videos.append(runner.decode(batch.latents))
        diffusion = runner.state.cfg.diffusion
        record = {"num_inference_steps": diffusion.num_inference_steps, "guidance_scale": diffusion.guidance_scale}
    finally:
        release_parallel(runner.state.owned)
    print(f"  {weights.parent.name}/{weights.name} {' '.join(flags)}: {seconds / len(prompts):.3f} s per video",
          flush=True)
    return torch.cat(videos), seconds / len(prompts), record


def mean_psnr(videos: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over videos of the PSNR (uint8 range) of each (3, T, H, W) video in [-1, 1] against its target."""
    from mindspeed_mm_osp.metrics.quality import psnr

    def frames(v: torch.Tensor) -> torch.Tensor:
        return ((v.permute(1, 2, 3, 0) + 1) * 127.5).clamp(0, 255)

    values = [psnr(frames(v), frames(t)) for v, t in zip(videos, targets)]
    return sum(min(v, 99.0) for v in values) / len(values)


def bench_teacher(name: str, files: dict, iters: int, out: Path, prompts: list[str]) -> dict:
    """The table rows of one teacher: PSNR against its 50 steps and seconds per video of every sampler."""
    out.mkdir(parents=True, exist_ok=True)
    rows, samples = {}, {}
    for steps in (TEACHER_STEPS, *STUDENTS):
        samples[f"teacher-{steps}"] = sample_videos(files["inference"], files["teacher"], prompts,
                                                    "--num-inference-steps", str(steps))
    losses = {}
    for steps in STUDENTS:
        weights, losses[steps] = distill_student(files, steps, iters, out)
        samples[f"student-{steps}"] = sample_videos(files["inference"], weights, prompts)
        record = samples[f"student-{steps}"][2]
        assert (record["num_inference_steps"], record["guidance_scale"]) == (steps, 1.0), record
    target = samples[f"teacher-{TEACHER_STEPS}"][0]
    for key, (videos, seconds, _) in samples.items():
        rows[key] = {"psnr_db": None if key == f"teacher-{TEACHER_STEPS}" else round(mean_psnr(videos, target), 2),
                     "seconds_per_video": round(seconds, 4)}
    gain = rows["student-4"]["psnr_db"] - rows["teacher-4"]["psnr_db"]
    speedup = rows[f"teacher-{TEACHER_STEPS}"]["seconds_per_video"] / rows["student-4"]["seconds_per_video"]
    return {"teacher": name, "iters": iters, "prompts": len(prompts), "rows": rows, "student4_gain_db": round(gain, 2),
            "student4_speedup": round(speedup, 2), "target_met": gain >= 3.0,
            "loss_first_last": {k: [round(v[0], 5), round(v[-1], 5)] for k, v in losses.items()}}


def _inference_json(models: Path, out: Path, predictor: dict) -> Path:
    """examples/tiny/inference.json on the models in `models`, with `predictor` keys replaced."""
    data = json.loads((ROOT / "examples/tiny/inference.json").read_text())
    data["ae"]["from_pretrained"] = str(models / "vae" / "merged.ckpt")
    for key, folder in [("text_encoder", "t5"), ("tokenizer", "t5"), ("text_encoder_2", "clip"),
                        ("tokenizer_2", "clip")]:
        data[key]["from_pretrained"] = str(models / folder)
    data["predictor"].update(predictor, from_pretrained=None)
    data["save_path"] = str(out / "unused")
    path = out / "inference.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _random_teacher(model_json: Path, out: Path, predictor: dict) -> tuple[Path, Path]:
    """(model JSON with `predictor` keys replaced, random perturbed weights of that predictor)."""
    from safetensors.torch import save_file

    from mindspeed_mm_osp.config import load_model_config
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict
    from mindspeed_mm_osp.testing import perturb_parameters

    data = json.loads(model_json.read_text())
    data["predictor"].update(predictor)
    path = out / "model.json"
    path.write_text(json.dumps(data, indent=1))
    torch.manual_seed(7)
    model = SparseUMMDiT(load_model_config(path).predictor)
    perturb_parameters(model, torch.Generator().manual_seed(8))
    save_file(local_state_dict(model), str(out / "teacher.safetensors"))
    return path, out / "teacher.safetensors"


def teachers(quick: bool, demo: Path, out: Path) -> dict:
    """Name -> the files a teacher's run reads (data and model JSON, teacher weights, inference JSON)."""
    if quick:
        from mindspeed_mm_osp.testing import make_tiny_setup

        (out / "quick").mkdir(parents=True, exist_ok=True)
        setup = make_tiny_setup(out / "quick")
        model, weights = _random_teacher(setup.model_json, out / "quick", {})
        return {"tiny-random": dict(data=setup.data_json, model=model, teacher=weights,
                                    inference=_inference_json(out / "quick" / "models", out / "quick", {}))}
    weights = demo / "merged" / "model_ema.safetensors"
    if not weights.is_file():
        raise SystemExit(f"bench_distill.py: no {weights}: run examples/tiny/run_demo.sh first (it trains the teacher)")
    wide = {"head_dim": 64}  # 4 heads x 64 = width 256
    (out / "w256").mkdir(parents=True, exist_ok=True)
    model, wide_weights = _random_teacher(ROOT / "examples/tiny/model.json", out / "w256", wide)
    demo_files = dict(data=ROOT / "examples/tiny/data.json", model=ROOT / "examples/tiny/model.json", teacher=weights,
                      inference=_inference_json(demo / "models", out, {}))
    return {"tiny-demo": demo_files,
            "w256": dict(demo_files, model=model, teacher=wide_weights,
                         inference=_inference_json(demo / "models", out / "w256", wide))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a random tiny teacher, a few iterations (CPU, ~2 min)")
    p.add_argument("--iters", type=int, default=None, help="distillation iterations per student (default 300; "
                                                           "quick: 6)")
    p.add_argument("--demo-dir", type=Path, default=ROOT / "demo_out", help="where run_demo.sh wrote its outputs")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    os.chdir(ROOT)  # the tiny JSONs name ./demo_out/... relative to the repository
    iters = args.iters or (6 if args.quick else 300)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        for name, files in teachers(args.quick, args.demo_dir.resolve(), Path(tmp)).items():
            result = bench_teacher(name, files, iters, Path(tmp) / name, PROMPTS[:4] if args.quick else PROMPTS)
            results.append(result)
            print(json.dumps(result, indent=1), flush=True)
    for r in results:
        line = "  ".join(f"{k} {v['psnr_db']} dB {v['seconds_per_video']:.3f} s" for k, v in r["rows"].items())
        print(f"{r['teacher']}: {line}; student-4 gain {r['student4_gain_db']} dB "
              f"({'met' if r['target_met'] else 'NOT met'}), speed-up {r['student4_speedup']}x")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "torch_threads": torch.get_num_threads()}, indent=1))
    if not math.isfinite(sum(r["student4_gain_db"] for r in results)):
        raise SystemExit("bench_distill.py: non-finite PSNR")


if __name__ == "__main__":
    main()
