"""SparseUMMDiT ("SUV"), the Open-Sora Plan v1.5 denoiser: a U-shaped MM-DiT with skiparse attention.

Read top to bottom: patchify + conditioning -> encoder stages (pushing skips) -> middle stage -> decoder stages
(popping skips, LIFO) -> final norms/modulation -> proj_out -> unpatchify. Every block is joint video+text
attention; blocks of a stage with sparse_n = k > 1 alternate single-skip (even) / group-skip (odd) skiparse.
`sparse1d=False` is the dense MMDiT with the same weights. State-dict keys follow the release (the
reference's `mindspeed_mmdit` branch; see docs/model.md, "State-dict keys").

Differences from the reference, on purpose:
* the final block's text params exist by config flag (`final_block_text_params`), not by the TP size;
* `double_ff=False` normalises/modulates the text before the shared FFN (the reference fed it raw:
  docs/reference_bugs.md, `double-ff-raw-text`);
* masks are key-padding masks, never square; `attention_mask=None` means all valid;
* sequences not divisible by TP under SP (CP x TP under CP) are padded and the padding is excluded from attention;
* context parallelism (Ulysses, `parallel/context_parallel.py`) splits the video over CP ranks after patch
  embedding and gathers it before `proj_out`; inside, attention sees the full sequence (see `JointAttention`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import platform
from ...config.predictor import PredictorConfig, RecomputeConfig
from ...parallel import ParallelDims, context_parallel, make_transformer_config
from .modules import (
    AdaNormOut,
    LayerNorm,
    ParallelContext,
    PatchEmbed2D,
    SparseMMDiTBlock,
    TimestepTextEmbedding,
    TokenLayout,
    rope_3d_tables,
    tag_sequence_parallel,
)
from .inpaint import widen_patch_embed
from .tp_layout import shard_state_dict, strip_extra_state, unwrap_state_dict


def _parallel_context(config: PredictorConfig, sequence_parallel: bool, params_dtype: torch.dtype,
                      dims: ParallelDims) -> ParallelContext:
    tp, cp_size = dims.tp, dims.cp
    config.validate_parallel(tp, cp_size)
    on_meta = torch.empty(()).device.type == "meta"
    kwargs = dict(tp=tp, params_dtype=params_dtype, perform_initialization=not on_meta)
    return ParallelContext(
        tp_size=tp, tp_rank=dims.tp_rank, sequence_parallel=bool(sequence_parallel and tp > 1),
        megatron=dims.distributed,
        init_weights=not on_meta, cp_size=cp_size, cp_rank=dims.cp_rank,
        layer_config=make_transformer_config(config.num_heads, config.hidden_size,
                                             sequence_parallel=sequence_parallel, **kwargs),
        modulation_config=make_transformer_config(config.num_heads, config.hidden_size, **kwargs))


def _skip_fusion(ctx: ParallelContext, dim: int, eps: float, zero_init: bool) -> nn.Sequential:
    """Sequential(norm or Identity, Linear(2D -> D)) over concat(current, skip). Zero-init: Identity and
    W = [I | 0], b = 0, so the fused stream equals the current one at init."""
    linear = nn.Linear(2 * dim, dim)
    if zero_init and ctx.init_weights:
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[:, :dim].copy_(torch.eye(dim))
            linear.bias.zero_()
    norm = nn.Identity() if zero_init else LayerNorm(2 * dim, eps)
    return tag_sequence_parallel(nn.Sequential(norm, linear), ctx)


@dataclass(frozen=True)
class EmbeddedInputs:
    """What `SparseUMMDiT.embed` hands to the blocks and the head: full streams (seq, batch, hidden), the
    conditioning, the token layout and the (batch, t, h, w) token grid."""

    x: torch.Tensor
    c: torch.Tensor
    temb: torch.Tensor
    layout: TokenLayout
    grid: tuple[int, int, int, int]


class SparseUMMDiT(nn.Module):
    """Open-Sora Plan v1.5 predictor.

    `self.config` is the megatron TransformerConfig (what megatron DDP / finalize_model_grads read);
    the model description is `self.predictor_config`.
    """

    def __init__(self, config: PredictorConfig, *, sequence_parallel: bool = False,
                 recompute: Optional[RecomputeConfig] = None, params_dtype: torch.dtype = torch.float32,
                 dims: Optional[ParallelDims] = None):
        super().__init__()
        ctx = _parallel_context(config, sequence_parallel, params_dtype, dims or ParallelDims.current())
        self.ctx = ctx
        self.predictor_config = config
        self.config = ctx.layer_config
        self.recompute = recompute or RecomputeConfig()
        if self.recompute.num_layers or self.recompute.selective_ffn_layers:
            platform.adapt_megatron()  # megatron's checkpoint saves/restores the "CUDA" RNG state
        dim, eps = config.hidden_size, config.norm_eps
        sparse_n = config.sparse_n if config.sparse1d else (1,) * len(config.num_layers)

        self.patch_embed = PatchEmbed2D(config.patch_embed_channels, dim, config.patch_size)
        self.time_text_embed = TimestepTextEmbedding(config.timestep_embed_dim, config.pooled_projection_dim)
        self.caption_projection = nn.Linear(config.caption_channels, dim)

        last = len(config.num_layers) - 1
        stages = []
        for s, (n_layers, k) in enumerate(zip(config.num_layers, sparse_n)):
            blocks = []
            for i in range(n_layers):
                final = s == last and i == n_layers - 1
                blocks.append(SparseMMDiTBlock(ctx, config, sparse_n=k, sparse_group=k > 1 and i % 2 == 1,
                                               text_out=not final or config.final_block_text_params))
            stages.append(nn.ModuleList(blocks))
        self.transformer_blocks = nn.ModuleList(stages)

        self.num_skips = len(config.num_layers) // 2
        if config.skip_connection:
            make = functools.partial(_skip_fusion, ctx, dim, eps, config.skip_connection_zero_init)
            self.skip_norm_linear = nn.ModuleList([make() for _ in range(self.num_skips)])
            self.skip_norm_linear_enc = nn.ModuleList([make() for _ in range(self.num_skips)])

        self.norm_final = tag_sequence_parallel(LayerNorm(dim, eps), ctx)
        self.norm_out = AdaNormOut(ctx, dim, config.timestep_embed_dim, eps)
        p, pt = config.patch_size, config.patch_size_t
        self.proj_out = nn.Linear(dim, pt * p * p * config.output_channels)

        for idx, block in enumerate(self.blocks(), start=1):
            block.recompute_ffn = self.recompute.ffn_only(idx)
        self.to(params_dtype)

    def blocks(self) -> list[SparseMMDiTBlock]:
        """All blocks in execution order (global 1-based layer index = position + 1)."""
        return [b for stage in self.transformer_blocks for b in stage]

    # ------------------------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, encoder_attention_mask: Optional[torch.Tensor] = None,
                pooled_projections: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity prediction (B, Cout, T, H, W), full on every TP rank.

        hidden_states (B, Cin, T, H, W) with Cin = `patch_embed_channels` (the inpaint variant takes
        `inpaint.inpaint_input(noisy, masked_latents, latent_mask)`); timestep (B,) = 1000 * sigma;
        encoder_hidden_states (B, S, Ccap) or (B, 1, S, Ccap); attention_mask (B, T, H, W) latent validity
        (1 = valid) or None; encoder_attention_mask (B, S) or (B, 1, S) (1 = real token) or None;
        pooled_projections (B, P) or (B, 1, P).

        The phases are public so that a sampler can replace the block stack (`diffusion.StepCache`).
        """
        inputs = self.embed(hidden_states, timestep, encoder_hidden_states, attention_mask, encoder_attention_mask,
                            pooled_projections)
        x, c = self.shard_streams(inputs)
        return self.head(self.run_blocks(x, c, inputs), inputs)

    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None, encoder_attention_mask: Optional[torch.Tensor] = None,
              pooled_projections: Optional[torch.Tensor] = None) -> "EmbeddedInputs":
        """Masks -> token validity, conditioning (fp32), patchify, caption projection: full (unsharded) streams."""
        if pooled_projections is None:
            raise ValueError("pooled_projections (CLIP text_embeds, (B, P) or (B, 1, P)) is required")
        cfg = self.predictor_config
        if hidden_states.shape[1] != cfg.patch_embed_channels:
            raise ValueError(f"{cfg.model_id} expects {cfg.patch_embed_channels} input channels, got "
                             f"{hidden_states.shape[1]}" + (" (noisy, masked-video latent and mask concatenated: "
                                                            "see models.predictor.inpaint.inpaint_input)"
                                                            if cfg.conditioned else ""))
        p = cfg.patch_size
        b, _, frames, height, width = hidden_states.shape
        t, h, w = frames, height // p, width // p  # patch_size_t == 1 (validated)
        dtype = self.proj_out.weight.dtype

        # A video token is valid if any latent pixel of its patch is.
        if attention_mask is None:
            video_valid = torch.ones(b, t * h * w, dtype=torch.bool, device=hidden_states.device)
        else:
            pooled_mask = F.max_pool3d(attention_mask[:, None].float(), kernel_size=(1, p, p), stride=(1, p, p))
            video_valid = pooled_mask.flatten(1) > 0
        if encoder_hidden_states.dim() == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        if encoder_attention_mask is None:
            text_valid = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        else:
            text_valid = encoder_attention_mask.reshape(b, -1) > 0

        # Streams in (seq, batch, hidden).
        temb = self.time_text_embed(timestep, pooled_projections.reshape(b, -1))
        x = self.patch_embed(hidden_states)
        c = self.caption_projection(encoder_hidden_states.to(dtype)).transpose(0, 1)
        cos, sin = rope_3d_tables(t, h, w, cfg.head_dim, (cfg.interpolation_scale_t, cfg.interpolation_scale_h,
                                                          cfg.interpolation_scale_w), hidden_states.device)
        layout = TokenLayout(video_len=x.shape[0], text_len=c.shape[0], rope_cos=cos, rope_sin=sin,
                             video_valid=video_valid, text_valid=text_valid)
        return EmbeddedInputs(x, c, temb, layout, (b, t, h, w))

    def shard_streams(self, inputs: "EmbeddedInputs") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (video, text) streams: the video split over CP, then each CP shard (and the CP-replicated
        text) over TP under SP. The padding to a multiple of CP x TP never reaches attention."""
        x = context_parallel.split_sequence(inputs.x, self.ctx.cp_size, self.ctx.cp_rank, self._sp_shards())
        return self._scatter(x), self._scatter(inputs.c)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, inputs: "EmbeddedInputs") -> torch.Tensor:
        """U-shaped stages on this rank's streams: encoder stages push (x, c), decoder stages pop them (LIFO) and
        fuse [current, skip]. Returns the video stream before the output head."""
        cfg = self.predictor_config
        skips = []
        layer_idx = 0
        for s, stage in enumerate(self.transformer_blocks):
            if s > self.num_skips and cfg.skip_connection:
                j = s - self.num_skips - 1
                x_skip, c_skip = skips.pop()
                x = self.skip_norm_linear[j](torch.cat([x, x_skip], dim=-1))
                c = self.skip_norm_linear_enc[j](torch.cat([c, c_skip], dim=-1))
            for block in stage:
                layer_idx += 1
                x, c = self._run_block(block, layer_idx, x, c, inputs.temb, inputs.layout)
            if s < self.num_skips and cfg.skip_connection:
                skips.append((x, c))
        return x

    def head(self, x: torch.Tensor, inputs: "EmbeddedInputs") -> torch.Tensor:
        """norm_final then norm_out (two LayerNorms, as the release), SP gather, project (on this CP shard: only
        the loss, replicated on every CP rank, comes after the CP gather), unpatchify."""
        b, t, h, w = inputs.grid
        p, cout = self.predictor_config.patch_size, self.predictor_config.output_channels
        x = self.norm_out(self.norm_final(x), inputs.temb)
        x = self.proj_out(self._gather(x))
        x = context_parallel.gather_sequence(x)[:inputs.layout.video_len].transpose(0, 1)  # (B, L, p*p*Cout)
        x = x.reshape(b, t, h, w, 1, p, p, cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, cout, t, h * p, w * p)

    def _run_block(self, block: SparseMMDiTBlock, layer_idx: int, x, c, temb, layout: TokenLayout):
        if self.training and torch.is_grad_enabled() and self.recompute.full_block(layer_idx):
            from megatron.core import tensor_parallel

            return tensor_parallel.checkpoint(functools.partial(block, layout=layout), False, x, c, temb)
        return block(x, c, temb, layout)

    def _sp_shards(self) -> int:
        return self.ctx.tp_size if self.ctx.sequence_parallel else 1

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.sequence_parallel:
            return x
        from megatron.core import tensor_parallel

        pad = -x.shape[0] % self.ctx.tp_size
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        return tensor_parallel.scatter_to_sequence_parallel_region(x)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.sequence_parallel:
            return x
        from megatron.core import tensor_parallel

        # proj_out runs identically on every rank afterwards, so the backward is a split, not a reduce-scatter.
        return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ----------------------------------------------------------------------------------------------------------------


def final_block_text_param_keys(config: PredictorConfig) -> list[str]:
    """Key prefixes of the final block's TP-dependent text params (the reference builds them iff TP>1)."""
    prefix = f"transformer_blocks.{len(config.num_layers) - 1}.{config.num_layers[-1] - 1}."
    keys = [prefix + "attn1.to_add_out.", prefix + "norm2.norm_enc."]
    if config.double_ff:
        keys.append(prefix + "ff_enc.")
    return keys


def has_final_block_text_params(state_dict: Mapping[str, object], config: PredictorConfig) -> bool:
    """True iff `state_dict` (merged or wrapped) carries the final block's text params; use it to set
    `PredictorConfig.final_block_text_params` before building the model that will load it."""
    prefix = final_block_text_param_keys(config)[0]
    return any(k.startswith(prefix) for k in unwrap_state_dict(state_dict))


def load_merged_state_dict(model: SparseUMMDiT, state_dict: Mapping[str, torch.Tensor], tp_local: bool = False) -> None:
    """Load a merged (TP=1 view, e.g. the released `model_ema.pt`) state dict into `model` at its TP rank; with
    `tp_local`, `state_dict` is already this rank's shard (`checkpoint.reader.load_weights_shard`).

    T2V weights load into the inpaint variant with `patch_embed` widened (new input channels zero, see
    `inpaint.widen_patch_embed`). Unwraps `ema_state_dict`/`model`/`state_dict`, drops `*._extra_state`, slices
    split keys for this rank, then loads strictly. Missing/unexpected keys and shape mismatches raise a ValueError naming them.
    """
    ctx = model.ctx
    full = widen_patch_embed(strip_extra_state(unwrap_state_dict(state_dict)), model.predictor_config)
    local = full if tp_local else shard_state_dict(full, ctx.tp_rank, ctx.tp_size)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(local))
    unexpected = sorted(set(local) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(local[k].shape)} (this rank's slice) vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in local and local[k].shape != v.shape)
    if missing or unexpected or shapes:
        cfg = model.predictor_config
        extras = final_block_text_param_keys(cfg)
        hint = ""
        if any(k.startswith(tuple(extras)) for k in missing + unexpected):
            hint = (f"\nhint: the final block's text params ({', '.join(e + '*' for e in extras)}) are "
                    f"{'present' if has_final_block_text_params(full, cfg) else 'absent'} in the checkpoint but "
                    f"final_block_text_params={cfg.final_block_text_params}; build the model with "
                    "final_block_text_params=has_final_block_text_params(state_dict, config)")
        raise ValueError("state dict does not match SparseUMMDiT:\n"
                         f"missing keys ({len(missing)}): {missing}\n"
                         f"unexpected keys ({len(unexpected)}): {unexpected}\n"
                         f"shape mismatches ({len(shapes)}): {shapes}{hint}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(local[key].to(dtype=param.dtype, device=param.device))


def local_state_dict(model: SparseUMMDiT) -> dict:
    """This rank's state dict without `_extra_state` entries (merge ranks with `merge_state_dicts`)."""
    return strip_extra_state(model.state_dict())
