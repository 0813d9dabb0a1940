"""Model assembly for training: frozen encoders outside DDP, the trainable predictor inside.

The WF-VAE and text encoders are plain eval-mode modules run without autograd, in their
own dtypes (`--model_custom_precision`), and never checkpointed: they are reloaded from
their pretrained paths at start-up. Only the SparseUMMDiT is wrapped in megatron-core DDP
and seen by the optimizer (frozen parameters get no grad buffer or optimizer state: docs/optimizer.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .. import platform
from ..config import ConfigError, ModelConfig
from ..config.dtypes import dtype_name, to_torch_dtype
from .args import ModelArgs, ParallelArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Per-component dtypes (reference: VAE fp32, text encoders and DiT bf16)."""

    vae: torch.dtype
    text: torch.dtype
    predictor: torch.dtype


def resolve_precision(model_cfg: ModelConfig, args: ModelArgs) -> Precision:
    if args.model_custom_precision:
        weight = to_torch_dtype(model_cfg.weight_dtype)
        vae = to_torch_dtype(model_cfg.ae.dtype) if model_cfg.ae is not None else weight
        precision = Precision(vae=vae, text=weight, predictor=weight)
    else:
        uniform = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        precision = Precision(vae=uniform, text=uniform, predictor=uniform)
    if precision.predictor == torch.float16:
        raise ConfigError(args.mm_model, "weight_dtype", "training the predictor in fp16 is not supported (no loss "
                          "scaler); use \"bf16\" (or --no-model_custom_precision with --bf16)")
    return precision


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


def wrap_ddp(model, parallel: ParallelArgs):
    """megatron-core DDP over the predictor (grads reduced in fp32; our TransformerConfig drives finalize)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.zero_grad(set_to_none=True)  # a stale .grad would be added into main_grad by the first hook
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
                                               use_distributed_optimizer=parallel.use_distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


__all__ = ["FrozenEncoders", "Precision", "resolve_precision", "wrap_ddp"]
