"""Mutation check: plant small, realistic bugs one at a time and confirm the tests named for each one fail.

    .venv/bin/python scripts/mutation_check.py [--rev REV] [--only NAME ...] [--list] [--timeout S] [--jobs N]

Works on private copies of the repository in a temporary folder (the tracked and untracked-but-not-ignored files
of the working tree, or the commit REV with --rev), never on the checkout itself, so it is safe while others
edit the tree. It first runs every named test unmutated (they must pass), then for each mutation: replaces the
exact original text (which must occur once) in its file, runs that mutation's fast test selection, and restores
the file (checked by hash). A mutation is "killed" when its tests fail. Prints a killed/survived table; exits 0
when every mutation was killed, 1 when any survived, errored, timed out or could not be applied (its original
text changed: update the list below), 2 on bad usage. Two mutations are tested at a time (`--jobs`), each in its
own copy; about 8 minutes on a 2-core machine shared with other work.

Run it before resolving any issue that touches the model, the losses, the optimizer or checkpoints (see
docs/CONTRIBUTING.md); add a mutation with the test that catches it when you guard a new piece of maths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "mindspeed_mm_osp/"
GOLDEN_PREDICTOR = "tests/unit/test_golden_predictor.py::test_output_matches_the_reference"
GOLDEN_VAE = "tests/unit/test_golden_vae.py"
GOLDEN_SCHEDULER = "tests/unit/test_golden_scheduler.py"
OBJECTIVE = "tests/unit/test_training_objective.py"
SPLIT_AXES = "tests/unit/test_convert_split_axes.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str           # relative to the repository root
    original: str       # exact text, present exactly once in `file`
    replacement: str
    tests: tuple[str, ...]


MUTATIONS = (
    # the model's maths, seen only by the reference outputs
    Mutation("rope-rotation-reversed", PKG + "models/predictor/modules.py",
             "rotated += [-b, a]", "rotated += [b, -a]", (GOLDEN_PREDICTOR,)),
    Mutation("timestep-sin-cos-swapped", PKG + "models/predictor/modules.py",
             "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
             "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", (GOLDEN_PREDICTOR,)),
    Mutation("adaln-shift-scale-swapped", PKG + "models/predictor/modules.py",
             "shift, scale, gate, enc_shift, enc_scale, enc_gate = mod.chunk(6, dim=-1)",
             "scale, shift, gate, enc_shift, enc_scale, enc_gate = mod.chunk(6, dim=-1)", (GOLDEN_PREDICTOR,)),
    Mutation("skiparse-group-skip-on-wrong-blocks", PKG + "models/predictor/sparseu_mmdit.py",
             "sparse_group=k > 1 and i % 2 == 1", "sparse_group=k > 1 and i % 2 == 0", (GOLDEN_PREDICTOR,)),
    Mutation("output-modulation-shift-scale-swapped", PKG + "models/predictor/modules.py",
             "shift, scale = gather_last_dim(self.ctx, mod)", "scale, shift = gather_last_dim(self.ctx, mod)",
             (GOLDEN_PREDICTOR,)),
    Mutation("gate-dropped-from-residual", PKG + "models/predictor/modules.py",
             "return (x.float() + gate * y.float()).to(x.dtype)", "return (x.float() + y.float()).to(x.dtype)",
             (GOLDEN_PREDICTOR,)),
    Mutation("qk-rmsnorm-sum-instead-of-mean", PKG + "models/predictor/modules.py",
             "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)", "torch.rsqrt(xf.pow(2).sum(-1, keepdim=True)",
             (GOLDEN_PREDICTOR,)),
    Mutation("skip-connections-fifo-not-lifo", PKG + "models/predictor/sparseu_mmdit.py",
             "x_skip, c_skip = skips.pop()", "x_skip, c_skip = skips.pop(0)", (GOLDEN_PREDICTOR,)),
    Mutation("text-padding-mask-ignored", PKG + "models/predictor/sparseu_mmdit.py",
             "text_valid = encoder_attention_mask.reshape(b, -1) > 0",
             "text_valid = encoder_attention_mask.reshape(b, -1) >= 0", (GOLDEN_PREDICTOR,)),
    # training objective
    Mutation("training-target-arguments-swapped", PKG + "training/step.py",
             "scheduler.training_target(x0, noise)", "scheduler.training_target(noise, x0)",
             ("tests/distributed/test_training.py::test_loss_decreases_on_the_tiny_demo",)),
    Mutation("training-target-negated", PKG + "diffusion/flow_matching.py",
             "return noise - x0", "return x0 - noise", (OBJECTIVE,)),
    Mutation("noising-weights-swapped", PKG + "diffusion/flow_matching.py",
             "return (s * noise.float() + (1.0 - s) * x0.float())",
             "return ((1.0 - s) * noise.float() + s * x0.float())",
             (OBJECTIVE,)),
    Mutation("loss-mask-normalised-by-all-elements", PKG + "diffusion/flow_matching.py",
             "return (err * mask).sum() / mask.sum()", "return (err * mask).sum() / mask.numel()", (OBJECTIVE,)),
    # schedules and sampling
    Mutation("sigma-shift-formula", PKG + "diffusion/flow_matching.py",
             "shifted = shift * sigmas / (1 + (shift - 1) * sigmas)", "shifted = shift * sigmas / (1 + shift * sigmas)",
             (GOLDEN_SCHEDULER,)),
    Mutation("dynamic-shift-intercept", PKG + "diffusion/flow_matching.py",
             "config.base_shift - k * config.base_image_seq", "config.base_shift", (GOLDEN_SCHEDULER,)),
    Mutation("cfg-formula-from-cond", PKG + "diffusion/sampling.py",
             "v = v_uncond + guidance_scale * (v_cond - v_uncond)", "v = v_cond + guidance_scale * (v_cond - v_uncond)",
             (GOLDEN_SCHEDULER,)),
    Mutation("guidance-rescale-to-uncond-std", PKG + "diffusion/sampling.py",
             "ratio = v_cond.std(dim=dims, keepdim=True)", "ratio = v_uncond.std(dim=dims, keepdim=True)",
             (GOLDEN_SCHEDULER,)),
    Mutation("euler-step-reversed", PKG + "diffusion/sampling.py",
             "(sigmas[i + 1] - sigmas[i]) * v.float()", "(sigmas[i] - sigmas[i + 1]) * v.float()",
             (GOLDEN_SCHEDULER,)),
    Mutation("sampler-timestep-of-next-sigma", PKG + "diffusion/sampling.py",
             "timestep = (sigmas[i] * 1000.0)", "timestep = (sigmas[i + 1] * 1000.0)", (GOLDEN_SCHEDULER,)),
    Mutation("encoder-dp-posterior-keyed-by-fetch-round", PKG + "training/batches.py",
             'keyed_generator(self.seed, "vae", micro_batch, self.dp_rank)',
             'keyed_generator(self.seed, "vae", micro_batch // self.group_size, self.dp_rank, self.group_rank)',
             ("tests/distributed/test_i2v_training.py::test_i2v_with_encoder_dp_equals_the_run_without",)),
    # VAE
    Mutation("vae-latent-scale-divides", PKG + "models/ae/autoencoder.py",
             "return (z - self.shift.to(z.dtype)) * self.scale.to(z.dtype)",
             "return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)", (GOLDEN_VAE,)),
    Mutation("vae-posterior-halves-swapped", PKG + "models/ae/wfvae.py",
             "mean, logvar = params.chunk(2, dim=1)", "logvar, mean = params.chunk(2, dim=1)", (GOLDEN_VAE,)),
    # optimizer, clipping, checkpoints, converter, LoRA
    Mutation("ema-decay-warmup-dropped", PKG + "optim/fused_ema_adamw.py",
             "return min(ema_decay, (1.0 + step) / (10.0 + step))", "return ema_decay",
             ("tests/unit/test_optim_fused_ema_adamw.py",)),
    Mutation("clip-threshold-4-sigma", PKG + "optim/adaptive_clip.py",
             "t_clip = self.mu + 3.0 * sigma", "t_clip = self.mu + 4.0 * sigma", ("tests/unit/test_clip_adaptive.py",)),
    Mutation("checkpoint-torch-rng-not-restored", PKG + "checkpoint/checkpointing.py",
             'torch.set_rng_state(state["torch_rng_state"])', "pass",
             ("tests/unit/test_checkpoint_io.py::test_layout_and_round_trip",)),
    Mutation("converter-norm-out-replicated", PKG + "models/predictor/tp_layout.py",
             r"(norm1|norm2|norm_out)\.linear", r"(norm1|norm2)\.linear", (SPLIT_AXES,)),
    Mutation("converter-lora-adapter-axes-swapped", PKG + "models/predictor/tp_layout.py",
             '{(0, "B"): 0, (1, "A"): 1}', '{(0, "A"): 0, (1, "B"): 1}', (SPLIT_AXES,)),
    Mutation("lora-scale-ignored", PKG + "models/lora.py",
             "self.scaling = config.scaling * scale", "self.scaling = config.scaling",
             ("tests/distributed/test_lora_checkpoint.py",)),
)


@dataclass
class Outcome:
    status: str         # passed / failed / error / timeout
    seconds: float
    tail: str


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, **kw)


def copy_repository(dest: Path, rev: str | None) -> None:
    """The commit `rev`, or the working tree's tracked and untracked-but-not-ignored files, into `dest`."""
    if rev is not None:
        archive = _git("archive", "--format=tar", rev).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # skips files deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def python_for_tests() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> Outcome:
    """pytest on `tests` inside `copy`, whose package shadows any installed one (PYTHONPATH first)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")])),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [python_for_tests(), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={copy}.pytest",
           *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", time.monotonic() - start, "")
    status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return Outcome(status, time.monotonic() - start, tail)


def check_isolation(copy: Path) -> None:
    """The tests must import the copy's package, not the checkout's editable install."""
    probe = subprocess.run([python_for_tests(), "-c", "import mindspeed_mm_osp; print(mindspeed_mm_osp.__file__)"],
                           cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(copy)):
        raise SystemExit(f"mutation_check.py: the copy's package is not the one imported ({probe.stdout.strip()} "
                         f"{probe.stderr.strip()[-200:]}); run it with the repository's .venv")


def apply_and_test(copy: Path, m: Mutation, timeout: float) -> tuple[str, float, str]:
    """(result, seconds, detail): killed / SURVIVED / NOT APPLIED / ERROR / TIMEOUT; the file is always restored."""
    path = copy / m.file
    if not path.is_file():
        return "NOT APPLIED", 0.0, f"{m.file}: no such file"
    text = path.read_text(encoding="utf-8")
    count = text.count(m.original)
    if count != 1:
        return "NOT APPLIED", 0.0, f"{m.file}: the original text occurs {count} times, expected once"
    digest = _sha256(path)
    try:
        path.write_text(text.replace(m.original, m.replacement), encoding="utf-8")
        outcome = run_tests(copy, m.tests, timeout)
    finally:
        path.write_text(text, encoding="utf-8")
        if _sha256(path) != digest:
            raise SystemExit(f"mutation_check.py: could not restore {path}")
    result = {"failed": "killed", "passed": "SURVIVED", "error": "ERROR", "timeout": "TIMEOUT"}[outcome.status]
    return result, outcome.seconds, outcome.tail if result != "killed" else ""


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", help="mutate this commit (git archive) instead of the working tree")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations (see --list)")
    p.add_argument("--list", action="store_true", help="print the mutations and their tests, then exit")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per test run (default 420)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="mutations tested at once, each in its own copy (default: 2, or 1 on one core)")
    args = p.parse_args(argv)
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        p.exit(2, f"mutation_check.py: --only: unknown mutation(s) {', '.join(unknown)}; see --list\n")
    if args.timeout <= 0:
        p.exit(2, "mutation_check.py: --timeout must be > 0 seconds\n")
    if args.jobs < 1:
        p.exit(2, "mutation_check.py: --jobs must be >= 1\n")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.file}\n{'':42s} -> {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation_check-") as tmp:
        copies = [Path(tmp) / f"copy{j}" for j in range(min(args.jobs, len(chosen)))]
        try:
            for copy in copies:
                copy.mkdir()
                copy_repository(copy, args.rev)
        except subprocess.CalledProcessError as exc:
            message = exc.stderr.decode(errors="replace").strip()
            print(f"mutation_check.py: --rev {args.rev}: {message}", file=sys.stderr)
            return 2
        check_isolation(copies[0])
        return report(copies, chosen, args.timeout)


def in_parallel(copies: list[Path], fn, items: list) -> list:
    """fn(copy, item) for every item, in order, at most one item per copy at a time."""
    free: queue.Queue = queue.Queue()
    for copy in copies:
        free.put(copy)

    def task(item):
        copy = free.get()
        try:
            return fn(copy, item)
        finally:
            free.put(copy)

    with ThreadPoolExecutor(len(copies)) as pool:
        return list(pool.map(task, items))


def report(copies: list[Path], chosen: list[Mutation], timeout: float) -> int:
    """Baseline, then every mutation; prints the table; 0 iff all were killed."""
    start = time.monotonic()
    selection = list(dict.fromkeys(t for m in chosen for t in m.tests))
    print(f"baseline: {len(selection)} test selections on the unmutated copies ...", flush=True)
    parts = [tuple(selection[j::len(copies)]) for j in range(len(copies))]
    for base in in_parallel(copies, lambda copy, tests: run_tests(copy, tests, timeout * 2), parts):
        if base.status != "passed":
            print(f"baseline {base.status} ({base.seconds:.0f}s): the tests must pass before mutating\n{base.tail}")
            return 1
    print(f"baseline passed ({time.monotonic() - start:.0f}s)", flush=True)

    def one(copy: Path, m: Mutation):
        result, seconds, detail = apply_and_test(copy, m, timeout)
        print(f"{m.name}: {result} ({seconds:.0f}s)" + (f"\n{detail}" if detail else ""), flush=True)
        return result, seconds

    rows = in_parallel(copies, one, chosen)
    print(f"\n{'mutation':42s} {'file':52s} {'result':11s} seconds")
    for m, (result, seconds) in zip(chosen, rows):
        print(f"{m.name:42s} {m.file:52s} {result:11s} {seconds:7.0f}")
    killed = sum(result == "killed" for result, _ in rows)
    print(f"\n{killed}/{len(rows)} killed in {time.monotonic() - start:.0f}s ({len(copies)} at a time)")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
