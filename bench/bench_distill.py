"""Few-step students by distillation (docs/distillation.md): how close 4 and 8 student steps get to the teacher's
50-step samples, next to the teacher's own 4 and 8 steps, and the sampling time per video.

Per teacher, two students (K = 4 and K = 8, teacher sub-steps 24/K, guidance 8 and rescale 0.7 folded in, shift 7:
the tiny inference JSON's sampler) are distilled through `pretrain.py`'s trainer (`--distill trajectory`, LoRA),
merged with `convert_mm_to_ckpt.py --lora-merge --ema` (the EMA of their adapters), then sampled by
`inference.py`'s runner on the student's recorded schedule. Two sets of 16 prompts, none of them a training
caption, prompt i always from the noise of seed 42 + i: `held-out`, the next 16 captions of the generator the
training captions come from (the target is judged on these: prompts of the kind the student was distilled on), and
`hand-written`, prompts of the same domain phrased otherwise (`PROMPTS`: how far the student reaches beyond its
training texts). PSNR is over the decoded videos (uint8 range), per video, averaged; the time is the denoising loop
per video (text encoding and decode excluded), measured in this run: the median over 3 rounds of 2 prompts in which
the samplers take turns.

Teachers: `tiny-demo`, the merged EMA weights that examples/tiny/run_demo.sh trains (run it first); `w256`, a
width-256 predictor (4 heads of 64) with random weights, distilled on the same data (it reads only the demo's
models/: VAE and text encoders); `w256-trained`, that width-256 predictor first trained from scratch as the demo
trains its tiny one (`--teacher-iters`, default 150), because a released teacher is trained. All of them see the
latents with the demo's measured normalisation (demo_out/inference.json). `--lora-r`, `--lr`, `--micro-batch-size`,
`--ema-decay` and `--lora-target-modules` set the students' adapters, learning rate, training points per iteration
and the EMA merged (default: r=32, lr 1e-3, 4 points, decay 0.99, the distillation's default targets, every
linear); the students read texts at the inference JSON's `model_max_length`. `--quick`: a random tiny teacher on a
throw-away synthetic set, a few iterations and 4 of the prompts (proves the path, not the target). `--captions N`
(default 1024): distil on N distinct captions generated from a word list of the prompts' domain (none of them a
benchmark prompt); 0: the demo's own data set and captions. The evaluation is the same either way.

    python bench/bench_distill.py --teacher tiny-demo --json distill.json   # ~45 min on 2 CPU cores
    python bench/bench_distill.py --json distill.json      # all three: hours (a width-256 iteration costs ~10x)
    python bench/bench_distill.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
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
TEACHERS = ("tiny-demo", "w256", "w256-trained")
STUDENTS = (4, 8)
TEACHER_STEPS = 50
SUBSTEPS_TOTAL = 24  # each student's teacher covers its K steps with 24 / K sub-steps
# a hang guard, not a time budget: a width-256 iteration took up to 24 s on 2 shared cores, so a fixed hour killed
# a live 200-iteration run
SECONDS_PER_ITERATION_LIMIT = 120


def _run_limit(iters: int) -> int:
    """Seconds a training run of `iters` iterations may take before it counts as hung."""
    return max(3600, SECONDS_PER_ITERATION_LIMIT * iters)


def _train_rank(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.distill import DistillTrainer

    return DistillTrainer(parse_args(argv, world_size=world_size)).fit().losses


def distill_student(files: dict, steps: int, iters: int, out: Path,
                    student: tuple[str, ...]) -> tuple[Path, list[float]]:
    """A K-step student of `files["teacher"]` trained for `iters` iterations, its adapters' EMA merged: (weights
    file, losses). `student`: the students' `pretrain.py` flags (LoRA rank, learning rate, batch, EMA decay,
    adapter targets)."""
    from mindspeed_mm_osp.checkpoint import convert
    from mindspeed_mm_osp.testing import run_distributed

    ckpt = out / f"student{steps}_ckpt"
    text_length = json.loads(Path(files["inference"]).read_text()).get("model_max_length", 512)
    argv = ["--mm-data", str(files["data"]), "--mm-model", str(files["model"]),
            "--train-iters", str(iters), "--train-epochs", "1000", "--lr-warmup-iters", "5",
            "--weight-decay", "0", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", str(max(1, iters // 5)),
            "--load", str(files["teacher"]), "--save", str(ckpt),
            "--distill", "trajectory", "--distill-student-steps", str(steps),
            "--distill-teacher-substeps", str(SUBSTEPS_TOTAL // steps), "--distill-text-length", str(text_length),
            *student]
    losses = run_distributed(_train_rank, 1, argv, timeout=_run_limit(iters))[0]
    merged = out / f"student{steps}"
    convert.main(["--lora-merge", "--ema", "--load_dir", str(ckpt), "--base", str(files["teacher"]), "--save_dir",
                  str(merged), "--format", "safetensors"])
    return merged / "model_ema.safetensors", losses


class Sampler:
    """`inference.py`'s runner for one weights file and flags, built once (the process group: `owned`)."""

    def __init__(self, config: Path, weights: Path, *flags: str):
        from mindspeed_mm_osp.inference.arguments import parse_args
        from mindspeed_mm_osp.inference.runner import InferenceRunner

        self.runner = InferenceRunner(parse_args(["--config", str(config), "--predictor-weights", str(weights),
                                                  "--seed", str(SEED), *flags]))
        self.runner.setup()
        self.runner.build(decode=True)
        diffusion = self.runner.state.cfg.diffusion
        self.record = {"num_inference_steps": diffusion.num_inference_steps, "guidance_scale": diffusion.guidance_scale}

    def denoise(self, index: int, prompt: str):
        """(the sample's batch, seconds of its denoising loop)."""
        batch = self.runner.encode_prompt([index], [prompt])
        start = time.perf_counter()
        self.runner.denoise(batch, progress=False)
        return batch, time.perf_counter() - start

    def videos(self, prompts: list[str]) -> torch.Tensor:
        """Decoded videos (N, 3, T, H, W) in [-1, 1] of `prompts`, prompt i from the noise of seed 42 + i."""
        return torch.cat([self.runner.decode(self.denoise(i, p)[0].latents) for i, p in enumerate(prompts)])

    def close(self) -> None:
        from mindspeed_mm_osp.inference.ranks import release_parallel

        release_parallel(self.runner.state.owned)


def seconds_per_video(config: Path, samplers: dict[str, tuple], prompts: list[str], rounds: int = 3) -> dict:
    """Median seconds of the denoising loop per video of each sampler (name -> (weights, *flags)), the samplers
    taking turns prompt by prompt so that a busy machine slows them alike."""
    built = {}
    try:
        for name, (weights, *flags) in samplers.items():
            built[name] = Sampler(config, weights, *flags)
        times = {name: [] for name in samplers}
        for _ in range(rounds):
            for i, prompt in enumerate(prompts):
                for name, sampler in built.items():
                    times[name].append(sampler.denoise(i, prompt)[1])
    finally:
        for sampler in reversed(list(built.values())):
            sampler.close()
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def mean_psnr(videos: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over videos of the PSNR (uint8 range) of each (3, T, H, W) video in [-1, 1] against its target."""
    from mindspeed_mm_osp.metrics.quality import psnr

    def frames(v: torch.Tensor) -> torch.Tensor:
        return ((v.permute(1, 2, 3, 0) + 1) * 127.5).clamp(0, 255)

    values = [psnr(frames(v), frames(t)) for v, t in zip(videos, targets)]
    return sum(min(v, 99.0) for v in values) / len(values)


def bench_teacher(name: str, files: dict, iters: int, out: Path, prompt_sets: dict[str, list[str]],
                  students: tuple[int, ...], student: tuple[str, ...]) -> dict:
    """The table rows of one teacher, per prompt set: PSNR against its 50 steps; and the seconds per video of every
    sampler (on the first set's first 2 prompts). The target is judged on the first set."""
    out.mkdir(parents=True, exist_ok=True)
    samplers = {f"teacher-{steps}": (files["teacher"], "--num-inference-steps", str(steps))
                for steps in (TEACHER_STEPS, *STUDENTS)}
    losses = {}
    for steps in students:
        weights, losses[steps] = distill_student(files, steps, iters, out, student)
        samplers[f"student-{steps}"] = (weights,)
    videos = {set_name: {} for set_name in prompt_sets}
    for key, (weights, *flags) in samplers.items():  # each sampler built once, for every prompt set
        sampler = Sampler(files["inference"], weights, *flags)
        try:
            if key.startswith("student"):
                assert (sampler.record["num_inference_steps"], sampler.record["guidance_scale"]) == (int(key[8:]), 1.0)
            for set_name, prompts in prompt_sets.items():
                videos[set_name][key] = sampler.videos(prompts)
        finally:
            sampler.close()
    scored = {}
    for set_name, by_key in videos.items():
        target = by_key.pop(f"teacher-{TEACHER_STEPS}")
        psnr = {key: round(mean_psnr(v, target), 2) for key, v in by_key.items()}
        # each student against the teacher at its own step count; the target is the 4-step student's
        scored[set_name] = {"prompts": len(prompt_sets[set_name]), "psnr_db": psnr,
                            "gain_db": {k: round(psnr[f"student-{k}"] - psnr[f"teacher-{k}"], 2) for k in students}}
    first = next(iter(prompt_sets))
    timed = seconds_per_video(files["inference"], samplers, prompt_sets[first][:2])
    return {"teacher": name, "iters": iters, "student_flags": list(student), "scored": scored,
            "seconds_per_video": {key: round(t, 4) for key, t in timed.items()},
            "target_met": scored[first]["gain_db"][4] >= 3.0 if 4 in students else None,
            "speedup": {k: round(timed[f"teacher-{TEACHER_STEPS}"] / timed[f"student-{k}"], 2) for k in students},
            "loss_first_last": {k: [round(v[0], 5), round(v[-1], 5)] for k, v in losses.items()}}


def _latent_norm(demo: Path) -> dict:
    """The `ae.shift`/`ae.scale` run_demo.sh measured on its trained VAE (its demo_out/inference.json), so the
    teachers see latents scaled as the demo's predictor was trained; none before the demo has run."""
    path = demo / "inference.json"
    if not path.is_file():
        return {}
    ae = json.loads(path.read_text())["ae"]
    return {"shift": ae["shift"], "scale": ae["scale"]}


def _inference_json(models: Path, out: Path, predictor: dict, norm: dict) -> Path:
    """examples/tiny/inference.json on the models in `models`, with `predictor` and the latent `norm` keys
    replaced."""
    data = json.loads((ROOT / "examples/tiny/inference.json").read_text())
    data["ae"].update(norm, from_pretrained=str(models / "vae" / "merged.ckpt"))
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


WORDS = (["a", "one", "a small", "a large", "a tiny", "a bright", "a pale", "a dark", "a glowing", "a lone"],
         ["white", "grey", "black", "silver", "light", "dim", "red", "blue"],
         ["square", "tile", "block", "box", "patch", "shape", "dot", "disc"],
         ["moving", "sliding", "drifting", "gliding", "travelling", "floating", "crawling", "jumping"],
         ["left", "right", "up", "down", "diagonally", "slowly", "steadily", "across the frame"],
         ["over a grey background", "on a dark field", "on a plain wall", "across the screen", "on black",
          "along the bottom", "near the top", "in the centre"])


def training_captions(count: int) -> list[str]:
    """`count` distinct captions drawn from `WORDS` (seeded), none of them a benchmark prompt: the student learns
    the teacher's response to text over the prompt domain, not to a handful of fixed strings."""
    import random

    rng, seen = random.Random(0), set(PROMPTS)
    captions = []
    while len(captions) < count:
        caption = " ".join(rng.choice(words) for words in WORDS)
        if caption not in seen:
            seen.add(caption)
            captions.append(caption)
    return captions


def held_out_prompts(captions: int, count: int = 16) -> list[str]:
    """The `count` captions `training_captions` draws after the `captions` a student trains on: prompts of the
    training captions' kind that no student saw (the target's test); `captions` 0 (the demo's own captions): the
    first `count`."""
    return training_captions(captions + count)[captions:]


def _caption_set(root: Path, count: int) -> Path:
    """data.txt of the synthetic set's random videos, each record repeated under `training_captions(count)` (the
    distillation reads only the caption and the latent shape from the data)."""
    videos = json.loads((root / "set3" / "clips.json").read_text())
    records = [dict(videos[i % len(videos)], id=f"C{i}", cap=cap) for i, cap in enumerate(training_captions(count))]
    (root / "set3" / "captions.json").write_text(json.dumps(records, indent=1))
    (root / "captions.txt").write_text(f"{root / 'set3'},{root / 'set3' / 'captions.json'}\n")
    return root / "captions.txt"


def _demo_configs(models: Path, out: Path, captions: int, norm: dict) -> dict:
    """The tiny demo's data and model JSONs on the models in `models` and a fresh copy of its synthetic data set
    (the generator is deterministic), so that the run reads nothing another job may rewrite under ./demo_out."""
    from mindspeed_mm_osp.testing import tiny_model_config
    from mindspeed_mm_osp.tools.make_synthetic_dataset import make_synthetic_dataset

    synthetic = make_synthetic_dataset(out / "data")
    data_txt = _caption_set(synthetic.root, captions) if captions else synthetic.data_txt
    # the demo's data JSONs: the whole set (the distillation's captions) and the clips its predictor trains on
    for template, path, name in (("data.json", data_txt, "data.json"), ("clips_data.json", synthetic.clips_txt,
                                                                          "clips.json")):
        data = json.loads((ROOT / "examples/tiny" / template).read_text())
        param = data["dataset_param"]
        param["basic_parameters"]["data_path"] = str(path)
        param["tokenizer_config"]["from_pretrained"] = str(models / "t5")
        param["tokenizer_config_2"]["from_pretrained"] = str(models / "clip")
        (out / name).write_text(json.dumps(data, indent=1))
    model = tiny_model_config({"vae": models / "vae" / "merged.ckpt", "t5": models / "t5", "clip": models / "clip"})
    model["ae"].update(norm)
    (out / "model.json").write_text(json.dumps(model, indent=1))
    return {"data": out / "data.json", "clips": out / "clips.json", "model": out / "model.json"}


def _pretrain_rank(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    pretrain(parse_args(argv, world_size=world_size))


def _trained_teacher(files: dict, model_json: Path, out: Path, iters: int) -> Path:
    """Merged EMA weights of the predictor of `model_json` trained from scratch as run_demo.sh trains the tiny one
    (its 8 clips, global batch 4 on 2 ranks, lr 2e-3, EMA 0.99) for `iters` iterations."""
    from mindspeed_mm_osp.checkpoint import convert
    from mindspeed_mm_osp.testing import run_distributed

    ckpt = out / "teacher_ckpt"
    argv = ["--mm-data", str(files["clips"]), "--mm-model", str(model_json), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--train-epochs", str(iters), "--lr", "2e-3",
            "--lr-warmup-iters", "4", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--weight-decay", "1e-4",
            "--clip-grad", "1.0", "--ema-decay", "0.99", "--seed", "1234", "--log-interval", str(max(1, iters // 5)),
            "--save", str(ckpt), "--save-interval", str(iters)]
    run_distributed(_pretrain_rank, 2, argv, timeout=_run_limit(iters))
    convert.main(["--load_dir", str(ckpt), "--save_dir", str(out / "teacher"), "--ema", "--format", "safetensors"])
    return out / "teacher" / "model_ema.safetensors"


def teachers(quick: bool, demo: Path, out: Path, captions: int, names: list[str], teacher_iters: int) -> dict:
    """Name -> the files a teacher's run reads (data and model JSON, teacher weights, inference JSON), for the
    teachers in `names`. `w256` reads only the demo's models/ (its VAE and text encoders), not its predictor."""
    if quick:
        from mindspeed_mm_osp.testing import make_tiny_setup

        (out / "quick").mkdir(parents=True, exist_ok=True)
        setup = make_tiny_setup(out / "quick")
        model, weights = _random_teacher(setup.model_json, out / "quick", {})
        return {"tiny-random": dict(data=setup.data_json, model=model, teacher=weights,
                                    inference=_inference_json(out / "quick" / "models", out / "quick", {}, {}))}
    if not (demo / "models" / "vae" / "merged.ckpt").is_file():
        raise SystemExit(f"bench_distill.py: no {demo / 'models'}: run examples/tiny/run_demo.sh first (it trains "
                         "the VAE and the tiny-demo teacher)")
    norm = _latent_norm(demo)
    demo_files = dict(_demo_configs(demo / "models", out, captions, norm),
                      inference=_inference_json(demo / "models", out, {}, norm))
    found = {}
    if "tiny-demo" in names:
        weights = demo / "merged" / "model_ema.safetensors"
        if not weights.is_file():
            raise SystemExit(f"bench_distill.py: no {weights}: run examples/tiny/run_demo.sh first (it trains the "
                             "teacher)")
        found["tiny-demo"] = dict(demo_files, teacher=weights)
    wide = {"head_dim": 64}  # 4 heads x 64 = width 256
    if "w256" in names:
        (out / "w256").mkdir(parents=True, exist_ok=True)
        model, wide_weights = _random_teacher(demo_files["model"], out / "w256", wide)
        found["w256"] = dict(demo_files, model=model, teacher=wide_weights,
                             inference=_inference_json(demo / "models", out / "w256", wide, norm))
    if "w256-trained" in names:
        (out / "w256-trained").mkdir(parents=True, exist_ok=True)
        model, _ = _random_teacher(demo_files["model"], out / "w256-trained", wide)
        found["w256-trained"] = dict(demo_files, model=model,
                                     teacher=_trained_teacher(demo_files, model, out / "w256-trained", teacher_iters),
                                     inference=_inference_json(demo / "models", out / "w256-trained", wide, norm))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a random tiny teacher, a few iterations (CPU, ~2 min)")
    p.add_argument("--iters", type=int, default=None, help="distillation iterations per student (default 300; "
                                                           "quick: 6)")
    p.add_argument("--demo-dir", type=Path, default=ROOT / "demo_out",
                   help="where run_demo.sh wrote its outputs (its models/ and merged/ are read)")
    p.add_argument("--teacher", choices=list(TEACHERS), action="append", default=None,
                   help="run only this teacher (repeatable; default: all three)")
    p.add_argument("--teacher-iters", type=int, default=150,
                   help="w256-trained: its training iterations before distillation (default 150, the demo's)")
    p.add_argument("--students", type=int, nargs="+", choices=STUDENTS, default=list(STUDENTS),
                   help="student step counts to distil")
    p.add_argument("--captions", type=int, default=1024, metavar="N",
                   help="distil on N generated captions, none a benchmark prompt (default 1024; 0: the demo's own "
                        "data set and captions)")
    p.add_argument("--lora-r", type=int, default=32, help="the students' LoRA rank (alpha = r)")
    p.add_argument("--lr", type=float, default=1e-3, help="the students' learning rate (5 warm-up iterations)")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="decay of the EMA of the students' adapters, which is what the bench merges (default 0.99)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="the students' micro-batch (= global batch: one rank): training points per iteration "
                        "(default 4; quick: 1, its throw-away set is too small for 4)")
    p.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help="the students' adapted linears (default: pretrain.py's distillation default, every linear)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    iters = args.iters or (6 if args.quick else 300)
    batch = str(args.micro_batch_size or (1 if args.quick else 4))
    student = ("--lora-r", str(args.lora_r), "--lr", str(args.lr), "--micro-batch-size", batch,
               "--global-batch-size", batch, "--ema-decay", str(args.ema_decay),
               *(("--lora-target-modules", *args.lora_target_modules) if args.lora_target_modules else ()))
    names = args.teacher or list(TEACHERS)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        for name, files in teachers(args.quick, args.demo_dir.resolve(), Path(tmp), args.captions, names,
                                     args.teacher_iters).items():
            size = 4 if args.quick else 16
            prompt_sets = {"held-out": held_out_prompts(0 if args.quick else args.captions, size),
                           "hand-written": PROMPTS[:size]}
            result = bench_teacher(name, files, iters, Path(tmp) / name, prompt_sets, tuple(args.students), student)
            results.append(result)
            print(json.dumps(result, indent=1), flush=True)
    for r in results:
        for set_name, scored in r["scored"].items():
            line = "  ".join(f"{k} {v} dB" for k, v in scored["psnr_db"].items())
            gains = "  ".join(f"student-{k} {v} dB" for k, v in scored["gain_db"].items())
            print(f"{r['teacher']}, {set_name} prompts: {line}; gain over the teacher's same steps: {gains}")
        times = "  ".join(f"{k} {v:.3f} s" for k, v in r["seconds_per_video"].items())
        target = {True: "met", False: "NOT met", None: "not judged (no 4-step student)"}[r["target_met"]]
        speedups = "  ".join(f"student-{k} {v}x" for k, v in r["speedup"].items())
        print(f"{r['teacher']}: target {target} (held-out prompts); per video: {times}; speed-up over "
              f"{TEACHER_STEPS} steps: {speedups}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "torch_threads": torch.get_num_threads()}, indent=1))
    if not math.isfinite(sum(g for r in results for sc in r["scored"].values() for g in sc["gain_db"].values())):
        raise SystemExit("bench_distill.py: non-finite PSNR")


if __name__ == "__main__":
    main()
