"""SparseUMMDiT: release key set/param count on `meta`, dense/sparse equivalence, masking, recompute, loading."""

import dataclasses
import json

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig, RecomputeConfig
from mindspeed_mm_osp.models.predictor import (
    SparseUMMDiT,
    final_block_text_param_keys,
    has_final_block_text_params,
    load_merged_state_dict,
    local_state_dict,
    merge_state_dicts,
    shard_state_dict,
    tp_split_dim,
)
from mindspeed_mm_osp.testing import perturb_parameters
from helpers import tiny_config

# predictor block of examples/opensoraplan1.5/model_opensoraplan1_5.json (the release), incl. keys our config ignores
RELEASE_JSON = """{
  "model_id": "SparseUMMDiT", "num_layers": [2, 4, 6, 8, 6, 4, 2], "sparse_n": [1, 2, 4, 8, 4, 2, 1],
  "double_ff": true, "sparse1d": true, "num_heads": 24, "head_dim": 128, "in_channels": 32, "out_channels": 32,
  "timestep_embed_dim": 1024, "caption_channels": 2048, "pooled_projection_dim": 1280, "skip_connection": true,
  "dropout": 0.0, "attention_bias": true, "patch_size": 2, "patch_size_t": 1, "activation_fn": "gelu-approximate",
  "norm_elementwise_affine": false, "norm_eps": 1e-06, "from_pretrained": null
}"""

def tiny_inputs(seed=0, frames=3, height=4, width=6, text=8):
    g = torch.Generator().manual_seed(seed)
    video_mask = torch.ones(2, frames, height, width)
    video_mask[1, -1] = 0
    text_mask = torch.ones(2, 1, text)
    text_mask[1, :, -3:] = 0
    return (torch.randn(2, 4, frames, height, width, generator=g), torch.tensor([0.0, 731.5]),
            torch.randn(2, 1, text, 24, generator=g), video_mask, text_mask, torch.randn(2, 1, 16, generator=g))


def randomize(model, seed=0):
    """Perturb every parameter (incl. norms and zero-init skips) so no path is trivially identity."""
    return perturb_parameters(model, torch.Generator().manual_seed(seed))


def expected_release_keys(cfg: PredictorConfig, final_extras: bool) -> dict:
    """Key -> shape, written independently from the key layout in docs/model.md ("State-dict keys")."""
    d, e, hd, p = cfg.hidden_size, cfg.timestep_embed_dim, cfg.head_dim, cfg.patch_size
    keys = {"patch_embed.proj.weight": (d, cfg.in_channels, p, p), "patch_embed.proj.bias": (d,),
            "caption_projection.weight": (d, cfg.caption_channels), "caption_projection.bias": (d,),
            "norm_final.weight": (d,), "norm_final.bias": (d,), "norm_out.linear.weight": (2 * d, e),
            "norm_out.linear.bias": (2 * d,), "norm_out.norm.weight": (d,), "norm_out.norm.bias": (d,),
            "proj_out.weight": (p * p * cfg.output_channels, d), "proj_out.bias": (p * p * cfg.output_channels,)}
    for name, fan_in in (("timestep_embedder", e), ("text_embedder", cfg.pooled_projection_dim)):
        m = f"time_text_embed.{name}."
        keys.update({m + "linear_1.weight": (e, fan_in), m + "linear_1.bias": (e,),
                     m + "linear_2.weight": (e, e), m + "linear_2.bias": (e,)})
    for j in range(len(cfg.num_layers) // 2):
        for name in ("skip_norm_linear", "skip_norm_linear_enc"):
            keys.update({f"{name}.{j}.1.weight": (d, 2 * d), f"{name}.{j}.1.bias": (d,)})
    n_stages = len(cfg.num_layers)
    for s, n in enumerate(cfg.num_layers):
        for i in range(n):
            final = s == n_stages - 1 and i == n - 1
            b = f"transformer_blocks.{s}.{i}."
            for norm in ("norm1", "norm2"):
                keys.update({b + f"{norm}.linear.weight": (6 * d, e), b + f"{norm}.linear.bias": (6 * d,),
                             b + f"{norm}.norm.weight": (d,), b + f"{norm}.norm.bias": (d,)})
            keys.update({b + "norm1.norm_enc.weight": (d,), b + "norm1.norm_enc.bias": (d,)})
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"):
                keys.update({b + f"attn1.{proj}.weight": (d, d), b + f"attn1.{proj}.bias": (d,)})
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                keys[b + f"attn1.{norm}.weight"] = (hd,)
            keys.update({b + "ff.net.0.proj.weight": (4 * d, d), b + "ff.net.2.weight": (d, 4 * d)})
            if not final or final_extras:
                keys.update({b + "attn1.to_add_out.weight": (d, d), b + "attn1.to_add_out.bias": (d,),
                             b + "norm2.norm_enc.weight": (d,), b + "norm2.norm_enc.bias": (d,),
                             b + "ff_enc.net.0.proj.weight": (4 * d, d), b + "ff_enc.net.2.weight": (d, 4 * d)})
    return keys


@pytest.mark.parametrize("extras,n_tensors,n_params", [(False, 1178, 8_504_661_120), (True, 1184, 8_589_604_992)])
def test_release_config_on_meta(extras, n_tensors, n_params):
    cfg = from_dict(PredictorConfig, {**json.loads(RELEASE_JSON), "final_block_text_params": extras})
    with torch.device("meta"):
        model = SparseUMMDiT(cfg, params_dtype=torch.bfloat16)
    sd = local_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_release_keys(cfg, extras)
    assert len(sd) == n_tensors
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert has_final_block_text_params(sd, cfg) == extras
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_tp_split_rules():
    assert tp_split_dim("transformer_blocks.3.2.attn1.to_q.weight") == 0
    assert tp_split_dim("transformer_blocks.3.2.attn1.add_v_proj.bias") == 0
    assert tp_split_dim("transformer_blocks.3.2.ff_enc.net.0.proj.weight") == 0
    assert tp_split_dim("transformer_blocks.0.0.norm2.linear.bias") == 0
    assert tp_split_dim("norm_out.linear.weight") == 0
    assert tp_split_dim("transformer_blocks.3.2.attn1.to_out.0.weight") == 1
    assert tp_split_dim("transformer_blocks.3.2.attn1.to_add_out.weight") == 1
    assert tp_split_dim("transformer_blocks.3.2.ff.net.2.weight") == 1
    for replicated in ("transformer_blocks.3.2.attn1.to_out.0.bias", "transformer_blocks.3.2.attn1.norm_q.weight",
                       "time_text_embed.timestep_embedder.linear_1.weight", "skip_norm_linear.0.1.weight",
                       "norm_out.norm.weight", "proj_out.weight", "caption_projection.weight"):
        assert tp_split_dim(replicated) is None, replicated


def test_shard_merge_round_trip_is_bitwise():
    sd = local_state_dict(SparseUMMDiT(tiny_config()))
    for tp in (2, 4):
        merged = merge_state_dicts([shard_state_dict(sd, r, tp) for r in range(tp)])
        assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)


def test_forward_shapes_and_zero_init_skips():
    model = SparseUMMDiT(tiny_config())
    for j in range(3):
        w = model.skip_norm_linear[j][1].weight
        assert torch.equal(w[:, :64], torch.eye(64)) and not w[:, 64:].any()
    out = model(*tiny_inputs())
    assert out.shape == (2, 4, 3, 4, 6) and torch.isfinite(out).all()
    # non-zero-init skips have a LayerNorm(2D) in slot 0
    sd = local_state_dict(SparseUMMDiT(tiny_config(skip_connection_zero_init=False)))
    assert sd["skip_norm_linear.0.0.weight"].shape == (128,) and "skip_norm_linear_enc.2.0.bias" in sd
    # image-shaped input, no masks, 2-D text inputs
    x, t, enc, _, _, pooled = tiny_inputs(frames=1, height=8, width=8)
    assert model(x, t, enc[:, 0], None, None, pooled[:, 0]).shape == (2, 4, 1, 8, 8)


def test_dense_equals_sparse_with_all_k_one():
    torch.manual_seed(0)
    dense = randomize(SparseUMMDiT(tiny_config(sparse1d=False)))
    ones = SparseUMMDiT(tiny_config(sparse_n=[1] * 7))
    load_merged_state_dict(ones, local_state_dict(dense))
    sparse = SparseUMMDiT(tiny_config())
    load_merged_state_dict(sparse, local_state_dict(dense))
    inputs = tiny_inputs()
    torch.testing.assert_close(dense(*inputs), ones(*inputs), rtol=0, atol=0)
    assert not torch.allclose(dense(*inputs), sparse(*inputs), atol=1e-4)  # skiparse really changes the grouping


@pytest.mark.parametrize("overrides", [{}, {"double_ff": False, "final_block_text_params": True}])
def test_padding_tokens_do_not_leak(overrides):
    torch.manual_seed(0)
    model = randomize(SparseUMMDiT(tiny_config(**overrides)))
    x, t, enc, vmask, tmask, pooled = tiny_inputs()
    ref = model(x, t, enc, vmask, tmask, pooled)
    x2, enc2 = x.clone(), enc.clone()
    x2[1, :, -1] += 10 * torch.randn_like(x2[1, :, -1])   # masked last latent frame of sample 1
    enc2[1, :, -3:] += 10 * torch.randn_like(enc2[1, :, -3:])  # padded text tokens of sample 1
    out = model(x2, t, enc2, vmask, tmask, pooled)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, :, :-1], ref[1, :, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[1, :, -1], ref[1, :, -1])  # masked positions themselves do change


def _grads(model, inputs, weight):
    model.zero_grad(set_to_none=True)
    out = model(*[i.clone().requires_grad_(i.is_floating_point() and i.dim() == 5) for i in inputs])
    (out * weight).sum().backward()
    # the final block's text params (if built) feed nothing: no grad, same as zero
    return out.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute,extras", [
    (RecomputeConfig(selective_ffn_layers=14), True), (RecomputeConfig(selective_ffn_layers=5), True),
    (RecomputeConfig(granularity="full", num_layers=14), True),
    (RecomputeConfig(granularity="full", num_layers=3), True),
    (RecomputeConfig(granularity="full", num_layers=14), False),  # final block passes its text stream through
])
def test_recompute_gives_identical_grads(recompute, extras):
    cfg = tiny_config(final_block_text_params=extras)
    torch.manual_seed(0)
    base = randomize(SparseUMMDiT(cfg)).train()
    other = SparseUMMDiT(cfg, recompute=recompute).train()
    load_merged_state_dict(other, local_state_dict(base))
    inputs = tiny_inputs()
    weight = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    out_a, grads_a = _grads(base, inputs, weight)
    out_b, grads_b = _grads(other, inputs, weight)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # reentrant backward may sum grad contributions in another order: fp32 round-off only
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_recompute_config_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        RecomputeConfig(granularity="full", num_layers=3, selective_ffn_layers=5)
    with pytest.raises(ValueError, match="needs num_layers"):
        RecomputeConfig(granularity="full")


def test_final_block_text_params_only_touch_the_text_stream():
    """Extras present or absent: same video output for the same shared weights (docs/model.md, "Final block's text
    parameters")."""
    torch.manual_seed(0)
    with_extras = randomize(SparseUMMDiT(tiny_config(final_block_text_params=True)))
    sd = local_state_dict(with_extras)
    without = SparseUMMDiT(tiny_config())
    with pytest.raises(ValueError, match="to_add_out") as err:
        load_merged_state_dict(without, sd)
    assert "final_block_text_params" in str(err.value)
    extras = tuple(final_block_text_param_keys(without.predictor_config))
    load_merged_state_dict(without, {k: v for k, v in sd.items() if not k.startswith(extras)})
    inputs = tiny_inputs()
    torch.testing.assert_close(without(*inputs), with_extras(*inputs), rtol=0, atol=0)


def test_loader_unwraps_and_drops_extra_state_and_names_bad_keys():
    src = SparseUMMDiT(tiny_config())
    sd = local_state_dict(src)
    wrapped = {"ema_state_dict": {**sd, "norm_out.linear._extra_state": None}}
    dst = SparseUMMDiT(tiny_config())
    load_merged_state_dict(dst, wrapped)
    assert all(torch.equal(v, sd[k]) for k, v in local_state_dict(dst).items())
    bad = dict(sd)
    bad.pop("proj_out.bias")
    bad["proj_out.extra"] = torch.zeros(1)
    bad["norm_final.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_merged_state_dict(dst, bad)
    msg = str(err.value)
    assert "proj_out.bias" in msg and "proj_out.extra" in msg and "norm_final.weight" in msg


def test_bf16_params_keep_fp32_islands():
    torch.manual_seed(0)
    model = SparseUMMDiT(tiny_config(), params_dtype=torch.bfloat16)
    x, t, enc, vmask, tmask, pooled = tiny_inputs()
    out = model(x.bfloat16(), t, enc.bfloat16(), vmask, tmask, pooled.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = SparseUMMDiT(tiny_config())
    load_merged_state_dict(ref, {k: v.float() for k, v in local_state_dict(model).items()})
    # max |bf16 - fp32| measured 0.0092 (outputs up to 1.7); about 3x that
    torch.testing.assert_close(out.float(), ref(x, t, enc, vmask, tmask, pooled), rtol=0, atol=0.03)


def test_parallel_config_validation():
    with pytest.raises(Exception, match="head_dim"):
        tiny_config(head_dim=24)
    assert dataclasses.replace(tiny_config(), num_heads=8).hidden_size == 128
