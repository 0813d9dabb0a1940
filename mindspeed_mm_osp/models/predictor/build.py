"""The one place a SparseUMMDiT is built for a run: training (`pretrain.py`) and sampling (`inference.py`)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from ...config.predictor import PredictorConfig, RecomputeConfig
from ...parallel import ParallelDims
from .sparseu_mmdit import SparseUMMDiT, has_final_block_text_params, load_merged_state_dict


def build_predictor(config: PredictorConfig, state_dict: Optional[Mapping[str, torch.Tensor]], dtype: torch.dtype,
                    device: torch.device, sequence_parallel: bool = False, *,
                    recompute: Optional[RecomputeConfig] = None, train: bool = False,
                    dims: Optional[ParallelDims] = None, tp_local: bool = False) -> SparseUMMDiT:
    """SparseUMMDiT for this TP rank on `device`, its weights sliced from the merged (TP=1) `state_dict`.

    The final block's text params exist exactly when `state_dict` carries them (the release, trained at TP>1,
    does). `train=True`: parameters created in `dtype` (a run from scratch initialises them from the RNG in that
    dtype), trainable. Otherwise Megatron's TP layers are created in fp32 and cast afterwards, as the reference
    does, and the model is returned in eval mode without gradients. `dims`: the layout to shard for (default:
    the process groups already built, if any). `tp_local`: `state_dict` is already this rank's shard
    (`checkpoint.weights.load_predictor_shard`), so no rank ever holds the whole model.
    """
    if state_dict is not None:
        config = dataclasses.replace(config, final_block_text_params=has_final_block_text_params(state_dict, config))
    model = SparseUMMDiT(config, sequence_parallel=sequence_parallel, recompute=recompute,
                         params_dtype=dtype if train else torch.float32, dims=dims)
    if train:
        model.to(device)
    if state_dict is not None:
        load_merged_state_dict(model, state_dict, tp_local)
    if train:
        return model
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = ["build_predictor"]
