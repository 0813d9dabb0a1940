"""Checkpoint cost, side by side in one run: how long a save pauses training (synchronous vs `--async-save`), save
and load speed against a plain copy of the same file on the same disk, and the peak host memory of each rank
loading released weights at TP=4 (the whole-file loader vs the memory-lean one).

Saves and loads are those of training (`save_checkpoint` / `load_checkpoint`, legacy layout) for the width-256
predictor (release stage layout at 4 heads x 64, as `bench_suv_vs_dense.py`) with its megatron optimizer, so the
file holds the weights, their fp32 EMA and both Adam moments. The pause of an async save is everything the loop
waits for: the snapshot and fork when the save starts, and the completion checks at each following iteration
boundary (the publish, with the manifest and the tracker, happens in one of them); training steps run while the
writer writes, and their slow-down is printed too (on a machine with spare cores it is small; here 2 cores are
shared). The plain copy is `shutil.copyfile` of the checkpoint file plus an fsync, as the save's atomic write
does.

Peak memory: 4 forked ranks (gloo, TP=4) each build the predictor from a released-layout file (`model_ema.pt`,
`{"ema_state_dict": ...}`, and the same weights as safetensors). The peak resident set of each rank while
loading and building (Linux `VmHWM`, reset through `/proc/self/clear_refs` just before; file pages mapped by the
loader count) is compared with what the rank must hold: its shard of the file plus its model, the model counted
both as the peak of building it without weights (megatron's initialisation leaves about as much again in the
heap) and as its tensors' bytes.

    python bench/bench_checkpoint.py            # release layout at width 256 (76M parameters)
    python bench/bench_checkpoint.py --quick    # one block per stage, 2 saves of each kind (~1 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_suv_vs_dense import LAYOUT
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.testing import run_distributed


def _layout(quick: bool) -> dict:
    return {**LAYOUT, "num_layers": [1] * 7} if quick else dict(LAYOUT)


def _trained(cfg):
    """The predictor in megatron DDP with its optimizer and schedule after one step, and that step."""
    import argparse as ap

    from megatron.core.distributed import finalize_model_grads

    from mindspeed_mm_osp.models.predictor import SparseUMMDiT
    from mindspeed_mm_osp.optim import build_lr_scheduler, build_optimizer
    from mindspeed_mm_osp.optim.megatron import OptimizerSettings
    from mindspeed_mm_osp.training.components import wrap_ddp

    torch.manual_seed(0)
    ddp = wrap_ddp(SparseUMMDiT(cfg).train(), ap.Namespace(overlap_grad_reduce=False, use_distributed_optimizer=False))
    settings = OptimizerSettings(clip_grad=0.0)
    optimizer = build_optimizer(ddp, settings)
    scheduler = build_lr_scheduler(optimizer, settings)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 1, 16, 16, generator=g)
    text = torch.randn(1, 16, cfg.caption_channels, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(x, torch.tensor([500.0]), text, pooled_projections=pooled).square().mean().backward()
        finalize_model_grads([ddp])
        optimizer.step()
        scheduler.step(1)
        return time.perf_counter() - t0

    step()
    return ddp, optimizer, scheduler, step


def _async_save(root: Path, it: int, objects, step, saves) -> dict:
    """One async save, then training steps until it is published: the loop's pause and the steps it overlapped."""
    from mindspeed_mm_osp.checkpoint import save_checkpoint

    ddp, optimizer, scheduler = objects
    t0 = time.perf_counter()
    save_checkpoint(root, it, ddp, optimizer, scheduler, async_saves=saves)
    start, checks, steps = time.perf_counter() - t0, [], []
    while saves.in_flight is not None:
        steps.append(step())
        t0 = time.perf_counter()
        saves.maybe_finalize()
        checks.append(time.perf_counter() - t0)
    return {"start": start, "stall": start + sum(checks), "publish": checks[-1], "steps": steps}


def _copy_seconds(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def _save_rank(rank: int, world_size: int, cfg, root: str, repeats: int) -> dict:
    from mindspeed_mm_osp.checkpoint import load_checkpoint, save_checkpoint
    from mindspeed_mm_osp.checkpoint.async_save import AsyncSaves
    from mindspeed_mm_osp.checkpoint.layout import model_file

    root = Path(root)
    ddp, optimizer, scheduler, step = _trained(cfg)
    baseline = statistics.median(step() for _ in range(3))
    out: dict = {"baseline_step": baseline, "sync": [], "async": [], "copy": [], "load": []}
    saves = AsyncSaves()
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        save_checkpoint(root / "sync", i, ddp, optimizer, scheduler)
        out["sync"].append(time.perf_counter() - t0)
        out["async"].append(_async_save(root / "async", i, (ddp, optimizer, scheduler), step, saves))
        out["copy"].append(_copy_seconds(model_file(root / "sync", i, 0), root / "copy.pt"))
        t0 = time.perf_counter()
        load_checkpoint(root / "sync", ddp, optimizer, scheduler, iteration=i)
        out["load"].append(time.perf_counter() - t0)
    out["bytes"] = model_file(root / "sync", repeats, 0).stat().st_size
    return out


def _peak_rss_reset() -> int:
    """Reset this process's peak resident set to its current size (Linux); returns that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _whole_file(path: Path) -> dict:
    """The loader before lean loading: the whole file into memory, then `build_predictor` slices it."""
    from safetensors.torch import load_file

    from mindspeed_mm_osp.checkpoint.safe_load import load_torch_file
    from mindspeed_mm_osp.models.predictor import strip_extra_state, unwrap_state_dict

    state = load_file(str(path)) if path.suffix == ".safetensors" else load_torch_file(path, "weights file")
    return strip_extra_state(unwrap_state_dict(state))


def _load_rank(rank: int, world_size: int, cfg, path: str, mode: str) -> dict:
    """Build this rank's predictor with no weights ("none"), from the whole file ("whole") or from its shard only
    ("lean"); its peak RSS above the start, the bytes of its shard of the file and of its model's tensors."""
    from mindspeed_mm_osp.checkpoint.weights import load_predictor_shard
    from mindspeed_mm_osp.models.predictor import build_predictor, tp_slice
    from mindspeed_mm_osp.parallel import ParallelDims

    dims, cpu, path = ParallelDims.current(), torch.device("cpu"), Path(path)
    before = _peak_rss_reset()
    state = {"none": lambda: None, "whole": lambda: _whole_file(path),
             "lean": lambda: load_predictor_shard(path, dims.tp_rank, dims.tp)}[mode]()
    model = build_predictor(cfg, state, torch.float32, cpu, train=True, dims=dims, tp_local=mode == "lean")
    peak = _status_bytes("VmHWM") - before
    shard = 0
    for key, value in (state or {}).items():
        piece = None if mode == "lean" else tp_slice(key, value.shape, dims.tp_rank, dims.tp)
        shard += value.numel() * value.element_size() // (dims.tp if piece else 1)
    held = sum(v.numel() * v.element_size() for v in model.state_dict().values() if torch.is_tensor(v))
    return {"peak": peak, "shard": shard, "model": held}


def _write_released(rank: int, world_size: int, cfg, root: str) -> int:
    """The predictor's weights as a released file (`model_ema.pt`) and as safetensors; returns their bytes. Run in
    a child, so that the ranks forked later from this process inherit no freed heap the loaders could reuse."""
    from mindspeed_mm_osp.io_atomic import atomic_save_safetensors
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict

    torch.manual_seed(0)
    weights = local_state_dict(SparseUMMDiT(cfg))
    torch.save({"ema_state_dict": weights}, Path(root) / "model_ema.pt")
    atomic_save_safetensors(weights, Path(root) / "model_ema.safetensors", {})
    return sum(v.numel() * v.element_size() for v in weights.values())


def measure_loading(cfg, root: Path, tp: int) -> list[str]:
    """Peak RSS above the start per rank, for each file format and loader, as lines of the report (worst rank)."""
    size = run_distributed(_write_released, 1, cfg, str(root))[0]
    alone = max(r["peak"] for r in run_distributed(_load_rank, tp, cfg, str(root / "model_ema.pt"), "none", tp=tp))
    mib = 2 ** 20
    lines = [f"peak RSS per rank, loading + building at TP={tp} (file {size / mib:.0f} MiB, fp32), worst rank; "
             f"building the model without weights peaks at {alone / mib:.0f} MiB",
             f"  {'file':<22} {'loader':<20} {'peak':>9} {'shard':>7} {'params':>7} {'/(shard+model)':>15} "
             f"{'/(shard+params)':>16}"]
    for name in ("model_ema.pt", "model_ema.safetensors"):
        for mode in ("whole", "lean"):
            ranks = run_distributed(_load_rank, tp, cfg, str(root / name), mode, tp=tp, timeout=600)
            r = max(ranks, key=lambda r: r["peak"])
            lines.append(f"  {name:<22} {'whole file (before)' if mode == 'whole' else 'lean (shard only)':<20} "
                         f"{r['peak'] / mib:5.0f} MiB {r['shard'] / mib:3.0f} MiB {r['model'] / mib:3.0f} MiB "
                         f"{r['peak'] / (r['shard'] + alone):14.2f}x {r['peak'] / (r['shard'] + r['model']):15.2f}x")
    return lines


def report_saves(out: dict) -> list[str]:
    gb = out["bytes"] / 1e9
    sync, copy, load = (statistics.median(out[k]) for k in ("sync", "copy", "load"))
    stall = statistics.median(a["stall"] for a in out["async"])
    start, publish = (statistics.median(a[k] for a in out["async"]) for k in ("start", "publish"))
    overlapped = [s for a in out["async"] for s in a["steps"]]
    return [
        f"checkpoint file {out['bytes'] / 2**20:.0f} MiB, {len(out['sync'])} saves of each kind, medians",
        f"sync save      {sync:7.3f} s  ({gb / sync:.2f} GB/s)   the loop waits for all of it",
        f"async save     {stall:7.3f} s  of pause ({start:.3f} s snapshot + fork, {publish:.3f} s the check that "
        f"published it, the rest other checks) = {stall / sync:.3f}x the sync save (target <= 0.2x)",
        f"               {len(overlapped)} training steps ran during the background writes: median "
        f"{statistics.median(overlapped):.3f} s vs {out['baseline_step']:.3f} s without a writer",
        f"plain copy     {copy:7.3f} s  ({gb / copy:.2f} GB/s)   shutil.copyfile + fsync of the same file",
        f"load (resume)  {load:7.3f} s  ({gb / load:.2f} GB/s)   load_checkpoint: read, checks, restore",
        f"save speed {copy / sync:.2f}x the copy's, load speed {copy / load:.2f}x the copy's",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one block per stage and 2 saves of each kind")
    parser.add_argument("--repeats", type=int, default=None, help="saves of each kind (default 3, quick 2)")
    parser.add_argument("--tp", type=int, default=4, help="ranks of the loading measurement (default 4)")
    args = parser.parse_args()
    cfg = from_dict(PredictorConfig, _layout(args.quick))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        out = run_distributed(_save_rank, 1, cfg, tmp, args.repeats or (2 if args.quick else 3), timeout=3600)[0]
        lines = report_saves(out)
        lines += measure_loading(cfg, Path(tmp), args.tp)
    print(f"predictor {'quick layout' if args.quick else 'release layout, width 256'}, fp32, one CPU thread per rank")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
