"""Run a function on N local ranks in about a second, and the gradient helpers of parallel-vs-single tests.

Children are forked from a parent that has already imported torch and megatron-core,
so they skip the ~3 s import; each gets a free port, gloo (or the accelerator's
backend), megatron groups, and returns its value or its traceback to the parent.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, tp: int, cp: int, seed: int, init_megatron: bool,
           fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from ..parallel import destroy_distributed, initialize_distributed

        if init_megatron:
            initialize_distributed(tp=tp, cp=cp, seed=seed, timeout_minutes=2)
        result = fn(rank, world_size, *args)
        try:
            payload = pickle.dumps(result)
        except Exception:  # unpicklable results are only reported as present
            payload = pickle.dumps(None)
        queue.put((rank, True, payload))
        if init_megatron:
            destroy_distributed()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        _end_helper_processes()
        os._exit(0)


def _end_helper_processes() -> None:
    """Run multiprocessing's exit handlers, which `os._exit` skips: helper processes a rank started (megatron's
    torch_dist writer keeps a queue-manager process for the life of its rank) end with it instead of lingering."""
    from multiprocessing import util

    try:
        util._exit_function()
    except Exception:  # a rank that is ending anyway: nothing else to do
        pass


def fork_ranks(fn: Callable, world_size: int, args: tuple, *, tp: int = 1, cp: int = 1, seed: int = 1234,
               init_megatron: bool = True) -> tuple[list, Any]:
    """Start `world_size` forked ranks running `fn(rank, world_size, *args)`; each puts (rank, ok, payload) on the
    returned queue, payload being its pickled result or its traceback."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, tp, cp, seed, init_megatron, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs, queue


def run_distributed(fn: Callable, world_size: int, *args, tp: int = 1, cp: int = 1, seed: int = 1234,
                    timeout: float = 120.0, init_megatron: bool = True) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` forked ranks; return results by rank.

    Any rank's exception is re-raised in the parent with every failing rank's traceback.
    """
    import megatron.core  # noqa: F401  (imported before fork so children share it)

    from .. import platform

    platform.adapt_megatron()
    procs, queue = fork_ranks(fn, world_size, args, tp=tp, cp=cp, seed=seed, init_megatron=init_megatron)
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.01)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) if not errors else 1.0)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world_size) if r not in results and r not in errors]
    if errors or missing:
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        if missing:
            parts.append(f"ranks {missing} returned nothing (timeout {timeout}s, crash or hang in a collective)")
        raise DistributedTestError("distributed run failed:\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]


def single_rank(fn: Callable, *args, tp: int = 1, **kwargs) -> Any:
    """Convenience: the same harness for one rank (megatron groups of size 1)."""
    return run_distributed(fn, 1, *args, tp=tp, **kwargs)[0]


def perturb_parameters(model: torch.nn.Module, generator: torch.Generator | None = None, scale: float = 0.05):
    """Add `scale` x N(0, 1) to every parameter (the default RNG unless `generator`): zero-initialised skips,
    gates and norms would otherwise make parallel-vs-single comparisons trivially equal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def ddp_outputs_and_grads(model: torch.nn.Module, cases, loss_scale: float = 1.0) -> list:
    """Per (inputs, loss weights) case, the output and the trainable params' reduced `main_grad`s, through a
    megatron-core DDP wrapper and `finalize_model_grads` as the training loop reduces them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False))
    results = []
    for inputs, weight in cases:
        ddp.zero_grad_buffer()
        out = ddp(*inputs)
        ((out * weight).sum() * loss_scale).backward()  # the full loss on each rank (Megatron convention)
        finalize_model_grads([ddp])
        results.append((out.detach(), {n: p.main_grad.clone() for n, p in model.named_parameters()
                                       if p.requires_grad}))
    return results


__all__ = ["DistributedTestError", "ddp_outputs_and_grads", "fork_ranks", "free_port", "perturb_parameters",
           "run_distributed", "single_rank"]
