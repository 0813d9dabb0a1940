"""LoRA vs full fine-tuning: trainable parameters, optimizer-state and grad bytes, step time, checkpoint size.

Part 1 (release config, shapes on `meta`, nothing allocated): parameters and the bytes each trainable parameter
costs in training (fp32 main grad 4 + fp32 master 4 + exp_avg 4 + exp_avg_sq 4 + EMA 4 = 20 B with bf16
weights) for full fine-tuning and LoRA at --rank; target: LoRA optimizer+grad memory <= 5% of full.
Part 2 (measured side by side in one run on this machine): the tiny model and a width-256 model, one megatron
DDP + FusedEmaAdamW training step (forward, backward, finalize, optimizer step), full vs LoRA.

    python bench/bench_lora.py [--rank 64] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import median_seconds  # noqa: E402

from mindspeed_mm_osp.config import load_model_config  # noqa: E402
from mindspeed_mm_osp.config.lora import LoRAConfig  # noqa: E402
from mindspeed_mm_osp.models.lora import apply_lora  # noqa: E402
from mindspeed_mm_osp.models.predictor import SparseUMMDiT  # noqa: E402
from mindspeed_mm_osp.testing import single_rank  # noqa: E402

TRAIN_BYTES_PER_PARAM = 4 + 4 + 4 + 4 + 4  # main grad, fp32 master, exp_avg, exp_avg_sq, EMA (bf16 weights)
# adapter checkpoint per trainable param: bf16 weight 2 + fp32 EMA 4 + exp_avg 4 + exp_avg_sq 4 + fp32 master 4
CKPT_BYTES_PER_PARAM = 2 + 4 + 4 + 4 + 4


def release_on_meta(rank: int) -> dict:
    cfg = load_model_config(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json").predictor
    cfg = dataclasses.replace(cfg, final_block_text_params=True)  # the released weights have them
    with torch.device("meta"):
        model = SparseUMMDiT(cfg, params_dtype=torch.bfloat16)
        total = sum(p.numel() for p in model.parameters())
        layers = apply_lora(model, LoRAConfig(r=rank))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "adapters": adapters, "layers": len(layers)}


def _step_rank(rank, world_size, cfg, lora_rank, iters, latent, text_len):
    from mindspeed_mm_osp.optim import build_optimizer
    from mindspeed_mm_osp.optim.megatron import OptimizerSettings
    from mindspeed_mm_osp.training.components import wrap_ddp
    from megatron.core.distributed import finalize_model_grads

    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).train()
    if lora_rank:
        apply_lora(model, LoRAConfig(r=lora_rank))
    ddp = wrap_ddp(model, argparse.Namespace(overlap_grad_reduce=False, use_distributed_optimizer=False))
    optimizer = build_optimizer(ddp, OptimizerSettings(clip_grad=0.0))
    g = torch.Generator().manual_seed(0)
    t, h, w = latent
    x = torch.randn(1, cfg.in_channels, t, h, w, generator=g)
    text = torch.randn(1, text_len, cfg.caption_channels, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(x, torch.tensor([500.0]), text, pooled_projections=pooled).square().mean().backward()
        finalize_model_grads([ddp])
        optimizer.step()

    seconds = median_seconds(step, iters)
    state = sum(v.numel() * v.element_size() for sub in optimizer.chained_optimizers
                for s in sub.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "state_bytes": state, "grad_bytes": grads, "step_s": seconds}


def measured(name: str, cfg, lora_rank: int, iters: int, latent, text_len) -> list[str]:
    full = single_rank(_step_rank, cfg, 0, iters, latent, text_len)
    lora = single_rank(_step_rank, cfg, lora_rank, iters, latent, text_len)
    rows = []
    for label, r in (("full", full), (f"LoRA r={lora_rank}", lora)):
        rows.append(f"| {name} | {label} | {r['trainable']:,} | {r['state_bytes'] / 2**20:.2f} | "
                    f"{r['grad_bytes'] / 2**20:.2f} | {1000 * r['step_s']:.1f} |")
    ratio_mem = (lora["state_bytes"] + lora["grad_bytes"]) / (full["state_bytes"] + full["grad_bytes"])
    rows.append(f"| {name} | LoRA / full | {lora['trainable'] / full['trainable']:.4f} | "
                f"{ratio_mem:.4f} (state+grad) | | {lora['step_s'] / full['step_s']:.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of the release-config estimate")
    p.add_argument("--small-rank", type=int, default=8, help="LoRA rank of the measured small models")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    iters = 3 if a.quick else 10

    rel = release_on_meta(a.rank)
    full_b, lora_b = rel["params"] * TRAIN_BYTES_PER_PARAM, rel["adapters"] * TRAIN_BYTES_PER_PARAM
    print(f"release config (meta): {rel['params']:,} params; LoRA r={a.rank} on {rel['layers']} layers: "
          f"{rel['adapters']:,} trainable ({100 * rel['adapters'] / rel['params']:.2f}%)")
    print(f"  optimizer+grad memory: full {full_b / 2**30:.1f} GiB, LoRA {lora_b / 2**30:.2f} GiB "
          f"= {100 * lora_b / full_b:.2f}% of full (target <= 5%: {'met' if lora_b <= 0.05 * full_b else 'MISSED'})")
    print(f"  adapter checkpoint: {rel['adapters'] * CKPT_BYTES_PER_PARAM / 2**30:.2f} GiB with optimizer state, "
          f"{rel['adapters'] * 2 / 2**20:.0f} MiB adapters only (bf16); full-model checkpoint "
          f"{rel['params'] * CKPT_BYTES_PER_PARAM / 2**30:.0f} GiB")

    tiny = load_model_config(ROOT / "examples/tiny/model.json").predictor
    wide = dataclasses.replace(tiny, num_layers=(1, 1, 1, 1, 1), sparse_n=(1, 2, 4, 2, 1), head_dim=64)
    print("\n| model | run | trainable params | optimizer state (MiB) | grad buffer (MiB) | step (ms) |")
    print("|---|---|---|---|---|---|")
    for line in (measured("tiny (D=64)", tiny, a.small_rank, iters, (3, 8, 16), 32)
                 + measured("width 256", wide, a.small_rank, iters, (3, 8, 16), 32)):
        print(line)


if __name__ == "__main__":
    main()
