"""SparseUMMDiT predictor (Open-Sora Plan v1.5): model, skiparse index maps, TP layout and checkpoint loading."""

from ...config.predictor import PredictorConfig, RecomputeConfig
from .build import build_predictor
from .inpaint import (
    compress_mask,
    generated_latent_frames,
    given_latent_frames,
    inpaint_input,
    masked_video,
    widen_patch_embed,
)
from .skiparse import (
    pad_to_skiparse,
    padded_length,
    skiparse_attention,
    skiparse_groups,
    skiparse_index,
    skiparse_inverse_index,
    skiparse_key_mask,
    skiparse_permute,
    skiparse_unpermute,
)
from .sparseu_mmdit import (
    SparseUMMDiT,
    final_block_text_param_keys,
    has_final_block_text_params,
    load_merged_state_dict,
    local_state_dict,
)
from .tp_layout import (merge_state_dicts, shard_state_dict, strip_extra_state, tp_slice, tp_split_dim,
                        unwrap_state_dict)

__all__ = [
    "PredictorConfig", "RecomputeConfig", "SparseUMMDiT", "build_predictor", "compress_mask",
    "final_block_text_param_keys", "generated_latent_frames", "given_latent_frames", "inpaint_input",
    "masked_video", "widen_patch_embed",
    "has_final_block_text_params", "load_merged_state_dict", "local_state_dict", "merge_state_dicts",
    "pad_to_skiparse", "padded_length", "shard_state_dict", "skiparse_groups", "skiparse_index",
    "skiparse_attention", "skiparse_inverse_index", "skiparse_key_mask", "skiparse_permute", "skiparse_unpermute",
    "strip_extra_state",
    "tp_slice", "tp_split_dim", "unwrap_state_dict",
]
