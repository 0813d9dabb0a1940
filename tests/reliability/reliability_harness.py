"""Shared pieces of the fault-injection suite (docs/reliability.md).

Training runs in processes forked from the test process (about a second each instead of
torchrun's ten): `start_ranks` gives back the live `Process` objects so a test can SIGKILL,
stop or time one rank, which `mindspeed_mm_osp.testing.run_distributed` (results only)
cannot. The children are started by `testing.fork_ranks`, as in `run_distributed`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# Imported before any fork so children start warm (transformers resolves model classes lazily).
import megatron.core  # noqa: F401
import mindspeed_mm_osp.checkpoint  # noqa: F401
import mindspeed_mm_osp.data  # noqa: F401
import mindspeed_mm_osp.models.ae  # noqa: F401
import mindspeed_mm_osp.models.predictor  # noqa: F401
import mindspeed_mm_osp.models.text  # noqa: F401
import mindspeed_mm_osp.optim  # noqa: F401
import mindspeed_mm_osp.training.trainer  # noqa: F401
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.testing import fork_ranks

platform.adapt_megatron()


def train_argv(assets: dict, *extra: str, iters: int = 2, data_json: Optional[Path] = None) -> list[str]:
    """Flags of a tiny single-micro-batch run on `tiny_assets`."""
    return ["--mm-data", str(data_json or assets["data_json"]), "--mm-model", str(assets["model_json"]),
            "--micro-batch-size", "1", "--train-iters", str(iters), "--lr", "1e-4", "--clip-grad", "1.0",
            "--seed", "1234", "--log-interval", "1", "--peak-tflops", "1", *extra]


@contextlib.contextmanager
def captured_log():
    """Text logged under `mindspeed_mm_osp` (the trainer's `basicConfig(force=True)` only resets the root)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    package = logging.getLogger("mindspeed_mm_osp")
    package.addHandler(handler)
    try:
        yield buf
    finally:
        package.removeHandler(handler)


def train(rank: int, world_size: int, argv: list[str]) -> dict:
    """Rank body: parse, train, report (module level so forked children can run it)."""
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    with captured_log() as log_text:
        result = pretrain(parse_args(argv, world_size=world_size))
    return {"iteration": result.iteration, "losses": result.losses, "skipped": result.skipped_iterations,
            "stop_reason": result.stop_reason, "log": log_text.getvalue()}


def cli_main(argv: list[str]) -> dict:
    """`pretrain.py`'s `main` in this process: exit code, stderr and the log."""
    from mindspeed_mm_osp.training.cli import main

    err = io.StringIO()
    code = 0
    with captured_log() as log_text:
        try:
            with contextlib.redirect_stderr(err):
                main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # what the interpreter would do with it: exit status 1 and a traceback
            code = 1
            err.write(traceback.format_exc())
    return {"code": code, "stderr": err.getvalue(), "log": log_text.getvalue()}


@dataclass
class Ranks:
    """Forked ranks of one run; `results()` collects what each returned (or its traceback)."""

    procs: list
    queue: Any
    started: float

    def results(self, timeout: float, wait_for: Optional[set[int]] = None) -> dict[int, tuple[bool, Any]]:
        """(ok, value or traceback) per rank that reported, waiting for `wait_for` (default: all ranks)."""
        import pickle

        wait_for = set(range(len(self.procs))) if wait_for is None else wait_for
        out: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while not wait_for <= out.keys() and time.monotonic() < deadline:
            if self.queue.empty():
                if not any(p.is_alive() for p in self.procs) and self.queue.empty():
                    break
                time.sleep(0.01)
                continue
            rank, ok, payload = self.queue.get()
            out[rank] = (ok, pickle.loads(payload) if ok else payload)
        return out

    def reap(self, grace: float = 5.0) -> None:
        for p in self.procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()


def start_ranks(fn: Callable, world_size: int, *args, tp: int = 1, cp: int = 1, init_megatron: bool = False) -> Ranks:
    """Fork `world_size` ranks running `fn(rank, world_size, *args)`.

    `init_megatron=False` leaves process-group creation to `pretrain`, so that its
    `--distributed-timeout-minutes` is the timeout in force.
    """
    started = time.monotonic()
    procs, queue = fork_ranks(fn, world_size, args, tp=tp, cp=cp, init_megatron=init_megatron)
    return Ranks(procs, queue, started)


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 240.0, **kw) -> dict[int, tuple[bool, Any]]:
    ranks = start_ranks(fn, world_size, *args, **kw)
    try:
        return ranks.results(timeout)
    finally:
        ranks.reap()


def assert_step_skipped(save_dir: Path, iteration: int) -> None:
    """The rank-0 checkpoint of `iteration` equals the previous one but for the skip counter: the step was
    skipped and changed nothing else."""
    from mindspeed_mm_osp.checkpoint.layout import model_file

    before, after = load_file(model_file(save_dir, iteration - 1, 0)), load_file(model_file(save_dir, iteration, 0))
    assert_same_training_state({**after, "clip_state": None}, {**before, "clip_state": None})
    kept = ("mu", "var", "initialized", "num_updates")
    assert {k: after["clip_state"][k] for k in kept} == {k: before["clip_state"][k] for k in kept}
    assert after["clip_state"]["total_skips"] == before["clip_state"]["total_skips"] + 1


def load_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, dict):
            assert_same_tensors(va, vb, f"{what}.{key}")
        elif torch.is_tensor(va):
            assert torch.equal(va, vb), f"{what}.{key}"
        else:
            assert va == vb, f"{what}.{key}"


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, EMA, optimizer moments, scheduler and clip statistics of two checkpoint payloads are identical."""
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema_model"], b["ema_model"], "ema_model")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.state")
    assert a["opt_param_scheduler"] == b["opt_param_scheduler"]
    assert a["clip_state"] == b["clip_state"]


def log(msg: str) -> None:
    """Figures for docs/reliability.md, visible with `pytest -s` (or `-rA`)."""
    print(f"[reliability] {msg}", file=sys.stderr)


__all__ = ["Ranks", "assert_same_tensors", "assert_same_training_state", "assert_step_skipped", "captured_log",
           "cli_main", "load_file", "log", "run_ranks", "start_ranks", "train", "train_argv"]
