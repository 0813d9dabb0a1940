"""`--async-save`: training goes on while a checkpoint is written (docs/checkpoints.md, "Async saves").

A save is cut in three. The snapshot (collective, on the main thread) is all the training loop pauses for. The
write runs in a process forked from the rank (megatron-core's `AsyncCallsQueue`, the machinery Megatron-LM uses):
a forked writer sees the rank's memory as it was at the fork (copy-on-write) and holds no lock the training
threads need, where a writer thread stalled the loop on the interpreter lock (about 10x slower steps while it
wrote, measured). So when the weights and the optimizer state are in host memory and the optimizer needs no
other rank to gather them, the snapshot is only the RNG states and the writer gathers the rest; otherwise
(state on an accelerator, or sharded over DP ranks) the snapshot copies the file's content to host memory first. The finalize (collective, on the main thread, never from
a background thread) runs once every rank's writer has finished: the ranks vote on the writes, then rank 0 writes
the manifest and the tracker, last, so a crash at any moment leaves the previous checkpoint as the latest.

`AsyncSaves.maybe_finalize` checks at iteration boundaries whether every rank is done (one small all-reduce per
iteration while a save is in flight); `wait` blocks until it is. At most one save is in flight: the next save,
the end of training and every stop wait for the pending one. A failed write raises `CheckpointWriteError` on
every rank, at the finalize. The writer dies with its rank (a SIGKILL of the rank kills it too), as on a node
loss.

Requests are megatron-core `AsyncRequest`s: `local_request` wraps a write function of ours (the legacy
layout's file), and `dist_checkpointing.save(..., async_sharded_save=True)` returns one for the torch_dist
format.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from typing import Callable, Optional

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

from .layout import CheckpointWriteError

logger = logging.getLogger(__name__)


def _die_with(parent: int) -> None:
    """Make this writer process die when its rank dies (Linux), so no orphan goes on writing after a crash."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the rank died before the line above took effect
        os._exit(1)


def _in_writer(async_fn: Callable, parent: int, *args, **kwargs):
    """Run a request's `async_fn` in the forked writer process, which dies with its rank."""
    _die_with(parent)
    torch.set_num_threads(1)  # no OpenMP pool in a forked process: OpenMP is not fork-safe
    return async_fn(*args, **kwargs)


def _write_and_report(write: Callable[[], tuple], send) -> None:
    """The writer process: `write()` -> (result, error or None), sent back through `send`."""
    result, error = write()
    try:
        pickle.dumps(error)
    except Exception:  # an exception that does not pickle travels as its text
        error = RuntimeError(f"{type(error).__name__}: {error}")
    send.send((result, error))
    send.close()


def local_request(write: Callable[[], tuple], finalize: Callable[..., object]) -> AsyncRequest:
    """An `AsyncRequest` that runs `write()` (returning (result, error or None), raising nothing) in the writer
    process, then `finalize(result, error)` on the main thread once every rank's writer has finished."""
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def finish() -> None:
        try:
            result, error = receive.recv() if receive.poll() else (
                None, RuntimeError("the background writer process ended without reporting (killed or crashed)"))
        finally:
            receive.close()
            send.close()
        finalize(result, error)

    return AsyncRequest(_write_and_report, (write, send), [finish])


class AsyncSaves:
    """The saves of one run with `--async-save`: at most one in flight. Every method is collective."""

    def __init__(self) -> None:
        self._queue = AsyncCallsQueue(persistent=False)
        self._iteration: Optional[int] = None  # the save in flight
        self._started = 0.0

    @property
    def in_flight(self) -> Optional[int]:
        """The iteration being written, None when no save is pending."""
        return self._iteration

    def schedule(self, iteration: int, request: AsyncRequest, *, stalled_s: float, waited_s: float) -> None:
        """Start writing `request` in the background; `stalled_s`: how long the loop paused for this save,
        `waited_s` of it for the previous one."""
        if self._iteration is not None:
            raise RuntimeError(f"checkpoint iteration {self._iteration} is still in flight: wait() first")
        t0 = time.monotonic()
        if request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(_in_writer, request.async_fn, os.getpid()))
        self._queue.schedule_async_request(request)
        self._iteration, self._started = iteration, time.monotonic()
        logger.info("checkpoint iteration %s: training paused %.3f s for the save (%.3f s of it waiting for the "
                    "previous one), writing in the background", iteration, stalled_s + self._started - t0, waited_s)

    def maybe_finalize(self, blocking: bool = False) -> Optional[int]:
        """Publish the save in flight if every rank has written it (with `blocking`, wait until they have);
        returns its iteration, or None. Raises `CheckpointWriteError` on every rank when a write failed."""
        iteration = self._iteration
        if iteration is None:
            return None
        try:
            if not self._queue.maybe_finalize_async_calls(blocking=blocking):
                return None
        except CheckpointWriteError:
            raise
        except Exception as exc:  # a failure reported by megatron's own writer (torch_dist)
            raise CheckpointWriteError(f"saving checkpoint iteration {iteration} in the background failed: "
                                       f"{exc}. The tracker still names the previous checkpoint.") from exc
        finally:
            if not self._queue.get_num_unfinalized_calls():
                self._iteration = None
        logger.info("checkpoint iteration %s: published %.3f s after its background write started", iteration,
                    time.monotonic() - self._started)
        return iteration

    def wait(self) -> float:
        """Block until the save in flight (if any) is published; returns the seconds waited."""
        t0 = time.monotonic()
        self.maybe_finalize(blocking=True)
        return time.monotonic() - t0


__all__ = ["AsyncSaves", "local_request"]
