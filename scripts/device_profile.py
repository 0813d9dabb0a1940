"""Where the MFU step's time goes: a torch profiler table of the top kernels of the release slice's training step.

    python3 scripts/device_profile.py OUT_DIR            # the release slice at 57x288x512, bf16 (device_check.sh)
    python3 scripts/device_profile.py OUT_DIR --tiny     # the tiny model in fp32, to check the script on CPU

The steps are `bench/bench_training_throughput.py`'s own (`measure`): one warm-up step, then two recorded
training steps; the recorder starts at the first forward after the warm-up, so the model's initialisation is
not in the table. Writes OUT_DIR/mfu_profile.txt (torch's table, sorted by self device time) and
OUT_DIR/mfu_profile.json (the top kernels and the share of device time in matmuls, attention and the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_training_throughput import measure  # noqa: E402

from mindspeed_mm_osp import platform  # noqa: E402
from mindspeed_mm_osp.config import load_model_config  # noqa: E402
from mindspeed_mm_osp.models.predictor import SparseUMMDiT  # noqa: E402

KINDS = (("attention", ("flash", "fmha", "attention", "attn")),
         ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "addmm", "aten::mm", "aten::bmm")))
TOP = 25


def kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, keys in KINDS if any(key in lowered for key in keys)), "other")


def summarise(averages, on_device: bool) -> dict:
    """Top entries by self time (device kernels on an accelerator, operators on CPU) and the share per kind."""
    events = [e for e in averages if not on_device or e.device_type == torch.autograd.DeviceType.CUDA]
    attr = "self_device_time_total" if on_device else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + getattr(e, attr) / total
    top = [{"name": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count, "share": getattr(e, attr) / total,
            "kind": kind(e.key)} for e in events[:TOP]]
    return {"recorded": "device kernels" if on_device else "CPU operators", "total_ms": total / 1e3,
            "share_by_kind": shares, "top": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, small latent (a CPU check of the script)")
    a = p.parse_args()
    if a.tiny:
        cfg, latent, text_len, dtype = load_model_config(ROOT / "examples/tiny/model.json").predictor, (3, 8, 16), 32, \
            torch.float32
    else:
        release = load_model_config(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json").predictor
        cfg = dataclasses.replace(release, num_layers=(2, 2, 2), sparse_n=(1, 2, 1))  # the throughput bench's slice
        latent, text_len, dtype = (8, 36, 64), 512, torch.bfloat16
    on_device = platform.accelerator() == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    prof, forwards = profile(activities=activities), []

    def start_after_warmup(module, args):
        if isinstance(module, SparseUMMDiT):
            forwards.append(1)
            if len(forwards) == 2:
                prof.start()

    hook = torch.nn.modules.module.register_module_forward_pre_hook(start_after_warmup)
    step = measure(cfg, latent, text_len, 1, dtype, steps=2, warmup=1)
    hook.remove()
    prof.stop()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if on_device else "self_cpu_time_total"
    averages = prof.key_averages()  # computed once: it walks every recorded event
    (out / "mfu_profile.txt").write_text(averages.table(sort_by=sort, row_limit=TOP, max_name_column_width=90))
    summary = {"latent": latent, "dtype": str(dtype), "step_s": step["step_s"], **summarise(averages, on_device)}
    (out / "mfu_profile.json").write_text(json.dumps(summary, indent=1))
    shares = ", ".join(f"{k} {v:.0%}" for k, v in summary["share_by_kind"].items())
    print(f"profile: {summary['recorded']}, {summary['total_ms']:.1f} ms over 2 steps; {shares}; "
          f"table in {out / 'mfu_profile.txt'}")


if __name__ == "__main__":
    main()
