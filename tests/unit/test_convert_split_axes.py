"""The checkpoint converter splits and merges every key along the axis Megatron's layers shard it on.

The expected axes are a table written out here by hand, one entry per key family, from how each layer is built:
column-parallel linears (q/k/v projections, adaLN modulation, first FFN layer) split their output features (dim 0,
bias too); row-parallel linears (attention outputs, second FFN layer) split their input features (dim 1, bias
replicated); everything else is replicated. The converter's own rule (`tp_split_dim`) is the code under test, so
it is never consulted here. A key family missing from the table fails the test: add it with its axis.
"""

import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import merge_shards, split_weights
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict
from mindspeed_mm_osp.testing import TINY_PREDICTOR_7_STAGES, tiny_predictor_config

COLUMN, ROW, REPLICATED = 0, 1, None

# Keys inside every `transformer_blocks.<stage>.<index>.` block.
BLOCK_AXES = {
    **{f"attn1.{p}.{t}": COLUMN for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
       for t in ("weight", "bias")},
    "attn1.to_out.0.weight": ROW, "attn1.to_out.0.bias": REPLICATED,
    "attn1.to_add_out.weight": ROW, "attn1.to_add_out.bias": REPLICATED,
    **{f"attn1.{n}.weight": REPLICATED for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")},
    **{f"{n}.linear.{t}": COLUMN for n in ("norm1", "norm2") for t in ("weight", "bias")},
    **{f"{n}.{m}.{t}": REPLICATED for n in ("norm1", "norm2") for m in ("norm", "norm_enc")
       for t in ("weight", "bias")},
    "ff.net.0.proj.weight": COLUMN, "ff.net.2.weight": ROW,
    "ff_enc.net.0.proj.weight": COLUMN, "ff_enc.net.2.weight": ROW,
    # LoRA adapters: B (out x r) of a column layer splits like its output, A (r x in) of a row layer like its input
    "attn1.to_q.lora_A": REPLICATED, "attn1.to_q.lora_B": COLUMN,
    "attn1.to_out.0.lora_A": ROW, "attn1.to_out.0.lora_B": REPLICATED,
}

# Keys outside the blocks.
TOP_AXES = {
    "norm_out.linear.weight": COLUMN, "norm_out.linear.bias": COLUMN,
    **{k: REPLICATED for k in (
        "patch_embed.proj.weight", "patch_embed.proj.bias", "caption_projection.weight", "caption_projection.bias",
        "norm_final.weight", "norm_final.bias", "norm_out.norm.weight", "norm_out.norm.bias", "proj_out.weight",
        "proj_out.bias",
        *(f"time_text_embed.{e}.linear_{i}.{t}" for e in ("timestep_embedder", "text_embedder") for i in (1, 2)
          for t in ("weight", "bias")),
        *(f"{s}.{j}.{m}.{t}" for s in ("skip_norm_linear", "skip_norm_linear_enc") for j in range(3) for m in (0, 1)
          for t in ("weight", "bias")))},
}


def _expected_axis(key: str):
    if key.startswith("transformer_blocks."):
        family = key.split(".", 3)[3]
        assert family in BLOCK_AXES, f"{key}: key family {family!r} has no expected axis in BLOCK_AXES"
        return BLOCK_AXES[family]
    assert key in TOP_AXES, f"{key}: no expected axis in TOP_AXES"
    return TOP_AXES[key]


@pytest.fixture(scope="module")
def full():
    """Every key of a tiny predictor (skip norms and the final block's text params included) plus LoRA adapters
    of rank 3 on two layers, filled with distinct random values."""
    with torch.device("meta"):
        model = SparseUMMDiT(tiny_predictor_config(TINY_PREDICTOR_7_STAGES, skip_connection_zero_init=False,
                                                   final_block_text_params=True))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in local_state_dict(model).items()}
    d = model.predictor_config.hidden_size
    for block in ("transformer_blocks.0.0", "transformer_blocks.3.1"):
        for layer in ("attn1.to_q", "attn1.to_out.0"):
            sd[f"{block}.{layer}.lora_A"] = torch.randn(3, d, generator=g)
            sd[f"{block}.{layer}.lora_B"] = torch.randn(d, 3, generator=g)
    return sd


@pytest.mark.parametrize("tp", [2, 4])
def test_split_follows_the_hand_written_axes_and_merge_inverts_it(full, tp):
    shards = split_weights(full, tp)
    for key, value in full.items():
        axis = _expected_axis(key)
        expected = [value] * tp if axis is None else list(value.chunk(tp, dim=axis))
        for rank, shard in enumerate(shards):
            assert torch.equal(shard[key], expected[rank]), f"{key}: TP rank {rank} is not the axis-{axis} slice"
    merged = merge_shards(shards)
    assert merged.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(merged[key], value), key
