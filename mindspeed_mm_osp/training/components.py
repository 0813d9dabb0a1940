"""Model assembly for training: frozen encoders outside DDP, the trainable predictor inside.

The WF-VAE and text encoders are plain eval-mode modules run without autograd, in their
own dtypes (`--model_custom_precision`), and never checkpointed: they are reloaded from
their pretrained paths at start-up. Only the SparseUMMDiT is wrapped in megatron-core DDP
and seen by the optimizer (integration notes §5).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import platform
from ..config import ModelConfig
from ..config.predictor import RecomputeConfig
from ..config.dtypes import dtype_name, to_torch_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Per-component dtypes (reference: VAE fp32, text encoders and DiT bf16)."""

    vae: torch.dtype
    text: torch.dtype
    predictor: torch.dtype


def resolve_precision(model_cfg: ModelConfig, args) -> Precision:
    if args.model_custom_precision:
        weight = to_torch_dtype(model_cfg.weight_dtype)
        vae = to_torch_dtype(model_cfg.ae.dtype) if model_cfg.ae is not None else weight
        precision = Precision(vae=vae, text=weight, predictor=weight)
    else:
        uniform = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        precision = Precision(vae=uniform, text=uniform, predictor=uniform)
    if precision.predictor == torch.float16:
        raise ValueError("training the predictor in fp16 is not supported (no loss scaler); use weight_dtype "
                         "\"bf16\" in the model JSON or --bf16")
    return precision


def recompute_config(args) -> RecomputeConfig:
    full = args.recompute_granularity == "full" and args.recompute_num_layers > 0
    return RecomputeConfig(granularity="full" if full else None, method="block",
                           num_layers=args.recompute_num_layers if full else 0,
                           selective_ffn_layers=args.recom_ffn_layers if args.selective_recom else 0)


def build_predictor(model_cfg: ModelConfig, args, precision: Precision):
    """SparseUMMDiT on this rank's device, with `predictor.from_pretrained` (merged weights) sliced for its TP rank."""
    from ..models.predictor import SparseUMMDiT, has_final_block_text_params, load_merged_state_dict

    cfg = model_cfg.predictor
    state = None
    if cfg.from_pretrained:
        state = load_weights_file(cfg.from_pretrained)
        cfg = dataclasses.replace(cfg, final_block_text_params=has_final_block_text_params(state, cfg))
    model = SparseUMMDiT(cfg, sequence_parallel=args.sequence_parallel, recompute=recompute_config(args),
                         params_dtype=precision.predictor)
    model.to(platform.device())
    if state is not None:
        load_merged_state_dict(model, state)
        logger.info("predictor weights loaded from %s", cfg.from_pretrained)
    return model


def load_weights_file(path: str | Path) -> dict:
    """A state dict from .safetensors or a torch file (.pt/.ckpt/.bin), with the file named in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (check `from_pretrained` in the model JSON)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None


class FrozenEncoders:
    """WF-VAE and T5/CLIP; each absent when the model JSON loads cached features instead."""

    def __init__(self, model_cfg: ModelConfig, precision: Precision):
        from ..models.ae import VideoAutoencoder
        from ..models.text import TextEncoders

        device = platform.device()
        self.vae = None
        self.text = None
        if not model_cfg.load_video_features:
            self.vae = VideoAutoencoder(dataclasses.replace(model_cfg.ae, dtype=dtype_name(precision.vae))).to(device)
        if not model_cfg.load_text_features:
            self.text = TextEncoders.from_config(model_cfg.text_encoder, model_cfg.text_encoder_2,
                                                 dtype=precision.text).to(device)


def optimizer_settings(args, precision: Precision):
    from ..optim.megatron import OptimizerSettings

    return OptimizerSettings(
        lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        ema_decay=args.ema_decay if args.optimizer_selection == "fused_ema_adamw" else 0.0,
        bf16=precision.predictor == torch.bfloat16, use_distributed_optimizer=args.use_distributed_optimizer,
        clip_grad=args.clip_grad, clip_grad_ema_decay=args.clip_grad_ema_decay or 0.0,
        max_consecutive_skips=args.max_consecutive_skips, train_iters=args.train_iters,
        lr_warmup_iters=args.lr_warmup_iters, lr_warmup_fraction=args.lr_warmup_fraction,
        lr_warmup_init=args.lr_warmup_init if args.lr_warmup_iters or args.lr_warmup_fraction else args.lr,
        lr_decay_style=args.lr_decay_style, lr_decay_iters=args.lr_decay_iters,
    )


def wrap_ddp(model, args):
    """megatron-core DDP over the predictor (grads reduced in fp32; our TransformerConfig drives finalize)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.zero_grad(set_to_none=True)  # a stale .grad would be added into main_grad by the first hook
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


__all__ = ["FrozenEncoders", "Precision", "build_predictor", "load_weights_file", "optimizer_settings",
           "recompute_config", "resolve_precision", "wrap_ddp"]
