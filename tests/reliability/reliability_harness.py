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
import os
import signal
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


def sigkill_one_rank_when(argv: list[str], ready: Callable[[], bool], delay: float):
    """Train one rank with `argv`; SIGKILL it `delay` s after `ready()` first holds (polled every 0.2 ms).
    Returns the finished process (its `exitcode` is -SIGKILL when the kill landed)."""
    ranks = start_ranks(train, 1, argv)
    proc = ranks.procs[0]
    while proc.is_alive() and not ready():
        time.sleep(0.0002)
    time.sleep(delay)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(240)
    ranks.reap()
    return proc


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


# ---- kill-during-save trials (test_kill_during_save, test_lora_reliability) ----

SAVE_ITERS = 2  # iterations of a kill-during-save trial, with a save after each


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfterBytes:
    """File wrapper for torch.save that dies once `limit` bytes went through."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            self.f.write(bytes(data)[: self.limit - self.written])
            self.f.flush()
            _die()
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


class _KillingOs:
    """`os` as seen by io_atomic, calling `at(point)` around fsync and replace (`at` kills at its point)."""

    def __init__(self, at: Callable[[str], None]):
        self.at = at

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        from mindspeed_mm_osp.checkpoint.layout import TRACKER_FILE

        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            self.at("payload_dir_fsync" if target.name.startswith("mp_rank_") else "tracker_dir_fsync")
        else:
            self.at("tracker_fsync" if TRACKER_FILE in target.name else "payload_fsync")
        return os.fsync(fd)

    def replace(self, src, dst):
        from mindspeed_mm_osp.checkpoint.layout import TRACKER_FILE

        kind = "tracker" if Path(dst).name == TRACKER_FILE else "payload"
        self.at(f"{kind}_replace")
        os.replace(src, dst)
        self.at(f"{kind}_replaced")


def train_and_kill_self(rank, world_size, argv, iteration: int, point: str, fraction: float, payload_size: int):
    """Train; SIGKILL this process at `point` of the save of `iteration` (`fraction` of the payload bytes)."""
    from mindspeed_mm_osp import io_atomic
    from mindspeed_mm_osp.checkpoint import io as ckpt_io

    state = {"iteration": None}
    write_payload = ckpt_io._write_payload

    def at(name: str) -> None:
        if state["iteration"] == iteration and name == point:
            _die()

    def payload(obj, f) -> None:
        name = Path(f.name).parent.parent.name  # iter_XXXXXXX
        state["iteration"] = int(name.split("_")[1])
        if state["iteration"] == iteration and point == "payload_bytes":
            f = _KillAfterBytes(f, int(fraction * payload_size))
        write_payload(obj, f)

    ckpt_io._write_payload = payload
    io_atomic.os = _KillingOs(at)
    return train(rank, world_size, argv)


def check_survived(save_dir: Path, reference: dict) -> int:
    """Every checkpoint file under its final name is complete and equals the uninterrupted run's (in
    `reference["dir"]`); the tracker names one of them (or nothing, when the first save was killed). Returns the
    tracker's iteration (0: none)."""
    from mindspeed_mm_osp.checkpoint.layout import model_file, read_tracker

    tracked = read_tracker(save_dir)  # raises on a torn tracker file
    for it in range(1, SAVE_ITERS + 1):
        path = model_file(save_dir, it, 0)
        if path.exists():
            got, want = load_file(path), load_file(model_file(reference["dir"], it, 0))
            assert (got["iteration"], got["consumed_train_samples"]) == (it, it)
            assert_same_training_state(got, want)
    if tracked is None:
        return 0
    assert model_file(save_dir, tracked, 0).exists(), f"tracker names iteration {tracked} but its file is absent"
    return int(tracked)


__all__ = ["Ranks", "SAVE_ITERS", "assert_same_tensors", "assert_same_training_state", "assert_step_skipped",
           "captured_log", "check_survived", "cli_main", "load_file", "log", "run_ranks", "start_ranks", "train",
           "train_and_kill_self", "train_argv"]
