"""Building blocks of SparseUMMDiT: TP linears, fp32 norms, embeddings, 3-D RoPE, joint attention, FFN, block.

Activations are (sequence, batch, hidden) like Megatron. Under sequence parallelism (SP) each TP rank holds a
contiguous slice of the video and of the text sequence between blocks; column-parallel linears all-gather the
sequence, row-parallel linears reduce-scatter it, so attention (incl. skiparse) always sees full sequences with the
rank's own heads (docs/model.md, "Tensor, sequence and context parallelism"). Under context parallelism (CP) each CP
rank holds a shard of the video sequence; `JointAttention` hands its projections to `parallel.context_parallel`,
whose all-to-all gives the full sequence with heads / CP heads, so attention below sees the same full sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...config.predictor import PredictorConfig
from ...parallel import context_parallel as cp
from .skiparse import skiparse_attention, skiparse_key_mask

# ----------------------------------------------------------------------------------------------------------------
# Tensor-parallel plumbing
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelContext:
    """How the layers are built: TP size/rank, SP, CP size/rank, and the megatron configs of the parallel linears.

    `megatron=False` (no process groups in the dims, TP=1) builds plain `LocalLinear` stand-ins with the same
    parameter names, so the model also runs without torch.distributed (e.g. on the `meta` device).
    """

    tp_size: int
    tp_rank: int
    sequence_parallel: bool
    megatron: bool
    init_weights: bool
    layer_config: object = None        # TransformerConfig, sequence_parallel as requested
    modulation_config: object = None   # same without SP: the adaLN linears read the replicated conditioning
    cp_size: int = 1                   # context-parallel (Ulysses) ranks sharing one sample's video sequence
    cp_rank: int = 0                   # which shard of that sequence this rank holds


def _normal_init(weight: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(weight, mean=0.0, std=0.02)


class LocalLinear(nn.Linear):
    """TP=1 stand-in for megatron's parallel linears: same keys, N(0, 0.02) weight, zero bias, returns (y, None)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_weights: bool):
        super().__init__(in_features, out_features, bias=bias)
        if init_weights:
            with torch.no_grad():
                _normal_init(self.weight)
                if self.bias is not None:
                    self.bias.zero_()

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return super().forward(x), None


def column_linear(ctx: ParallelContext, in_features: int, out_features: int, *, bias: bool,
                  replicated_input: bool = False) -> nn.Module:
    """Output features split over TP. `replicated_input`: the input is the same full tensor on every rank (no SP
    all-gather; its grad is all-reduced instead)."""
    if not ctx.megatron:
        return LocalLinear(in_features, out_features, bias, ctx.init_weights)
    from megatron.core import tensor_parallel

    config = ctx.modulation_config if replicated_input else ctx.layer_config
    return tensor_parallel.ColumnParallelLinear(in_features, out_features, config=config, init_method=_normal_init,
                                                bias=bias, gather_output=False)


def row_linear(ctx: ParallelContext, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
    """Input features split over TP; output all-reduced (or reduce-scattered along the sequence with SP)."""
    if not ctx.megatron:
        return LocalLinear(in_features, out_features, bias, ctx.init_weights)
    from megatron.core import tensor_parallel

    return tensor_parallel.RowParallelLinear(in_features, out_features, config=ctx.layer_config,
                                             init_method=_normal_init, bias=bias, input_is_parallel=True,
                                             skip_bias_add=False)


def gather_last_dim(ctx: ParallelContext, x: torch.Tensor) -> torch.Tensor:
    """All-gather a column-parallel output along features. Backward: with SP each rank used the result on its own
    tokens, so partial grads are reduce-scattered; without SP every rank saw all tokens, so the grad is split."""
    if ctx.tp_size == 1:
        return x
    from megatron.core import tensor_parallel

    if ctx.sequence_parallel:
        return tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(x)
    return tensor_parallel.gather_from_tensor_model_parallel_region(x)


def tag_sequence_parallel(module: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Mark replicated params that only see this rank's tokens under SP; `finalize_model_grads` sums their grads
    over TP (docs/optimizer.md, "Inside megatron")."""
    if ctx.sequence_parallel:
        for p in module.parameters():
            p.sequence_parallel = True
    return module


# ----------------------------------------------------------------------------------------------------------------
# Norms (fp32 islands)
# ----------------------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """Always-affine LayerNorm computed in fp32 and cast back (the reference's legacy LN; `norm_elementwise_affine`
    is ignored by the release, so every LN has weight and bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class HeadRMSNorm(nn.Module):
    """RMSNorm over head_dim, one weight shared by all heads: statistics in fp32, cast back, then * weight.

    Under TP each rank only sees its heads, so the weight's grad is partial; it is summed over TP inside autograd
    (identity forward / all-reduce backward), which is right with and without SP. The weight is therefore NOT
    tagged `sequence_parallel` (that would sum twice).
    """

    def __init__(self, dim: int, eps: float, tp_size: int):
        super().__init__()
        self.eps = eps
        self.tp_size = tp_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        weight = self.weight
        if self.tp_size > 1:
            from megatron.core import tensor_parallel

            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        return y * weight


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y in fp32, stored back in the residual dtype."""
    return (x.float() + gate * y.float()).to(x.dtype)


def maybe_clamp(x: torch.Tensor, training: bool) -> torch.Tensor:
    """fp16 inference guard of the reference: NaN->0 and clamp to the fp16 range at block and FFN entry."""
    if training or x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x).clamp(-65504.0, 65504.0)


class AdaNormZero(nn.Module):
    """adaLN for both streams (the reference's `OpenSoraNormZero`, not zero-initialised despite the name).

    `linear(SiLU(temb))` -> 6 chunks in the order shift, scale, gate, enc_shift, enc_scale, enc_gate; modulation
    math in fp32. `with_text=False` (final block without text params) builds no `norm_enc`.
    """

    def __init__(self, ctx: ParallelContext, dim: int, embed_dim: int, eps: float, with_text: bool):
        super().__init__()
        self.ctx = ctx
        self.linear = column_linear(ctx, embed_dim, 6 * dim, bias=True, replicated_input=True)
        self.norm = tag_sequence_parallel(LayerNorm(dim, eps), ctx)
        self.norm_enc = tag_sequence_parallel(LayerNorm(dim, eps), ctx) if with_text else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        mod, _ = self.linear(F.silu(temb).to(self.linear.weight.dtype))
        mod = gather_last_dim(self.ctx, mod).float()[None]  # (1, B, 6D), broadcasts over the sequence
        shift, scale, gate, enc_shift, enc_scale, enc_gate = mod.chunk(6, dim=-1)
        xn = (self.norm(x).float() * (1 + scale) + shift).to(x.dtype)
        cn = None
        if self.norm_enc is not None:
            cn = (self.norm_enc(c).float() * (1 + enc_scale) + enc_shift).to(c.dtype)
        return xn, cn, gate, enc_gate


class AdaNormOut(nn.Module):
    """Output modulation `norm_out`: LN(x) * (1 + scale) + shift with (shift, scale) = linear(SiLU(temb))."""

    def __init__(self, ctx: ParallelContext, dim: int, embed_dim: int, eps: float):
        super().__init__()
        self.ctx = ctx
        self.linear = column_linear(ctx, embed_dim, 2 * dim, bias=True, replicated_input=True)
        self.norm = tag_sequence_parallel(LayerNorm(dim, eps), ctx)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        mod, _ = self.linear(F.silu(temb).to(self.linear.weight.dtype))
        shift, scale = gather_last_dim(self.ctx, mod).float()[None].chunk(2, dim=-1)
        return (self.norm(x).float() * (1 + scale) + shift).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


class PatchEmbed2D(nn.Module):
    """Per-frame Conv2d patchify (kernel = stride = p); tokens in (t, y, x) raster order, output (L, B, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w).to(self.proj.weight.dtype))  # (B*T, D, h, w)
        y = y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])                       # (B, L, D)
        return y.transpose(0, 1)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class MLPEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection(act_fn="silu")`)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x.to(self.linear_1.weight.dtype))))


class TimestepTextEmbedding(nn.Module):
    """Conditioning vector temb = timestep MLP(sinusoid(t)) + pooled-CLIP MLP, returned in fp32 (B, E)."""

    def __init__(self, embed_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.timestep_embedder = MLPEmbedding(embed_dim, embed_dim)
        self.text_embedder = MLPEmbedding(pooled_projection_dim, embed_dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        time_emb = self.timestep_embedder(timestep_sinusoid(timestep, self.embed_dim))
        return (time_emb + self.text_embedder(pooled)).float()


def rope_3d_tables(t: int, h: int, w: int, head_dim: int, scales: tuple[float, float, float],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim), fp32, for the (t, h, w) raster; chunks t/h/w of 4/6/6 sixteenths of head_dim,
    base 10000, each chunk's angles duplicated [theta, theta] for the rotate-half convention (docs/model.md,
    "3-D RoPE").

    Rebuilt every forward (microseconds): no cache to key by shape/scale/device (docs/reference_bugs.md,
    `rope-cache-ignores-scale`)."""
    sizes = rope_chunk_sizes(head_dim)
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (t, h, w)), indexing="ij")
    angles = []
    for pos, size, scale in zip(grid, sizes, scales):
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, size, 2, dtype=torch.float32, device=device) / size))
        theta = (pos.reshape(-1, 1) / scale) * inv_freq[None]
        angles.append(torch.cat([theta, theta], dim=-1))
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def rope_chunk_sizes(head_dim: int) -> tuple[int, int, int]:
    return (head_dim // 16) * 4, (head_dim // 16) * 6, (head_dim // 16) * 6


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (L, B, heads, hd) with per-chunk rotate-half, in fp32, cast back."""
    xf = x.float()
    rotated = []
    for chunk in xf.split(rope_chunk_sizes(x.shape[-1]), dim=-1):
        a, b = chunk.chunk(2, dim=-1)
        rotated += [-b, a]
    rotated = torch.cat(rotated, dim=-1)
    return (xf * cos[:, None, None] + rotated * sin[:, None, None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention and FFN
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenLayout:
    """Per-forward facts every block needs: true (unpadded) lengths, RoPE tables, validity masks, and the
    skiparse key-padding masks built once per (k, group) and shared by all blocks."""

    video_len: int
    text_len: int
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    video_valid: torch.Tensor  # (B, L) bool
    text_valid: torch.Tensor   # (B, S) bool
    _masks: dict = field(default_factory=dict)

    def key_mask(self, k: int, group: bool) -> torch.Tensor:
        if (k, group) not in self._masks:
            self._masks[(k, group)] = skiparse_key_mask(self.video_valid, self.text_valid, k, group)
        return self._masks[(k, group)]


class JointAttention(nn.Module):
    """MM-DiT joint attention over [video; text] with RMS QK-norm, 3-D RoPE on video q/k and skiparse grouping.

    Keys: to_q/to_k/to_v, add_q_proj/add_k_proj/add_v_proj (column), to_out.0 and to_add_out (row),
    norm_q/norm_k/norm_added_q/norm_added_k.
    """

    def __init__(self, ctx: ParallelContext, cfg: PredictorConfig, sparse_n: int, sparse_group: bool,
                 text_out: bool):
        super().__init__()
        dim, bias = cfg.hidden_size, cfg.attention_bias
        self.head_dim = cfg.head_dim
        self.tp_seq_shards = ctx.tp_size if ctx.sequence_parallel else 1
        self.cp_size = ctx.cp_size
        self.sparse_n = sparse_n
        self.sparse_group = sparse_group
        self.to_q = column_linear(ctx, dim, dim, bias=bias)
        self.to_k = column_linear(ctx, dim, dim, bias=bias)
        self.to_v = column_linear(ctx, dim, dim, bias=bias)
        self.add_q_proj = column_linear(ctx, dim, dim, bias=bias)
        self.add_k_proj = column_linear(ctx, dim, dim, bias=bias)
        self.add_v_proj = column_linear(ctx, dim, dim, bias=bias)
        self.norm_q = HeadRMSNorm(cfg.head_dim, cfg.norm_eps, ctx.tp_size)
        self.norm_k = HeadRMSNorm(cfg.head_dim, cfg.norm_eps, ctx.tp_size)
        self.norm_added_q = HeadRMSNorm(cfg.head_dim, cfg.norm_eps, ctx.tp_size)
        self.norm_added_k = HeadRMSNorm(cfg.head_dim, cfg.norm_eps, ctx.tp_size)
        self.to_out = nn.ModuleList([row_linear(ctx, dim, dim, bias=True), nn.Dropout(cfg.dropout)])
        self.to_add_out = row_linear(ctx, dim, dim, bias=True) if text_out else None

    def _video_heads(self, proj: nn.Module, x: torch.Tensor, length: int) -> torch.Tensor:
        """Project (this CP shard, full over TP after the SP all-gather), split heads, all-to-all to the full
        sequence with this CP rank's heads, drop the padding: (length, B, heads / (TP*CP), hd)."""
        y, _ = proj(x)
        return cp.sequence_to_heads(y.unflatten(-1, (-1, self.head_dim)))[:length]

    def _text_heads(self, proj: nn.Module, c: torch.Tensor, length: int) -> torch.Tensor:
        """Project the (CP-replicated) text, drop SP padding, keep this CP rank's heads."""
        y, _ = proj(c)
        return cp.local_heads(y[:length].unflatten(-1, (-1, self.head_dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: TokenLayout):
        k, group = self.sparse_n, self.sparse_group
        length_x, length_c = layout.video_len, layout.text_len
        # RoPE and the skiparse regroup run after the all-to-all, on the full sequence: positions are global.
        qx = apply_rope(self.norm_q(self._video_heads(self.to_q, x, length_x)), layout.rope_cos, layout.rope_sin)
        kx = apply_rope(self.norm_k(self._video_heads(self.to_k, x, length_x)), layout.rope_cos, layout.rope_sin)
        vx = self._video_heads(self.to_v, x, length_x)
        qc = self.norm_added_q(self._text_heads(self.add_q_proj, c, length_c))
        kc = self.norm_added_k(self._text_heads(self.add_k_proj, c, length_c))
        vc = self._text_heads(self.add_v_proj, c, length_c)

        ox, oc = skiparse_attention(qx, kx, vx, qc, kc, vc, layout.key_mask(k, group), k, group)

        # back to this CP shard at the (TP-divisible) padded length the row-parallel reduce-scatter expects
        shard_len = x.shape[0] * self.tp_seq_shards
        ox = cp.heads_to_sequence(_pad_seq(ox, shard_len * self.cp_size)).flatten(-2)
        ax, _ = self.to_out[0](ox)
        ax = self.to_out[1](ax)
        ac = None
        if self.to_add_out is not None:
            oc = cp.gather_heads(oc.flatten(-2))
            ac, _ = self.to_add_out(_pad_seq(oc, c.shape[0] * self.tp_seq_shards))
        return ax, ac


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 0 of (seq, ...) to `length`."""
    return x if x.shape[0] == length else torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])


class FeedForward(nn.Module):
    """net.0.proj (column, no bias) -> GELU in fp32 (tanh approx.) -> Dropout -> net.2 (row, no bias)."""

    def __init__(self, ctx: ParallelContext, dim: int, dropout: float, approximate: str):
        super().__init__()
        proj = nn.Module()
        proj.proj = column_linear(ctx, dim, 4 * dim, bias=False)
        self.net = nn.ModuleList([proj, nn.Dropout(dropout), row_linear(ctx, 4 * dim, dim, bias=False)])
        self.approximate = approximate
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.net[0].proj(x)
        h = F.gelu(h.float(), approximate=self.approximate).to(h.dtype)
        if self.training and self.net[1].p > 0 and self.ctx.megatron:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():  # sharded activations: TP-distinct stream
                h = self.net[1](h)
        else:
            h = self.net[1](h)
        y, _ = self.net[2](h)
        return y


# ----------------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------------


class SparseMMDiTBlock(nn.Module):
    """adaLN-1 -> joint attention -> gated residuals -> adaLN-2 -> FFN(s) -> gated residuals.

    `text_out=False` only for the final block when the checkpoint has no final-block text params: its text stream
    output is discarded, so it gets no to_add_out / norm2.norm_enc / ff_enc and no text residuals.
    With `double_ff=False` one FFN is shared by both streams; unlike the reference the text is normalised and
    modulated by `norm2.norm_enc` before it (docs/reference_bugs.md, `double-ff-raw-text`).
    """

    def __init__(self, ctx: ParallelContext, cfg: PredictorConfig, sparse_n: int, sparse_group: bool,
                 text_out: bool):
        super().__init__()
        dim, embed, eps = cfg.hidden_size, cfg.timestep_embed_dim, cfg.norm_eps
        approximate = "tanh" if cfg.activation_fn == "gelu-approximate" else "none"
        self.norm1 = AdaNormZero(ctx, dim, embed, eps, with_text=True)
        self.attn1 = JointAttention(ctx, cfg, sparse_n, sparse_group, text_out)
        self.norm2 = AdaNormZero(ctx, dim, embed, eps, with_text=text_out)
        self.ff = FeedForward(ctx, dim, cfg.dropout, approximate)
        self.ff_enc = FeedForward(ctx, dim, cfg.dropout, approximate) if cfg.double_ff and text_out else None
        self.recompute_ffn = False  # set by SparseUMMDiT from RecomputeConfig

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, layout: TokenLayout):
        x, c = maybe_clamp(x, self.training), maybe_clamp(c, self.training)
        xn, cn, gate, enc_gate = self.norm1(x, c, temb)
        ax, ac = self.attn1(xn, cn, layout)
        x = gated_add(x, gate, ax)
        if ac is not None:
            c = gated_add(c, enc_gate, ac)
        if self.recompute_ffn and self.training and torch.is_grad_enabled():
            from megatron.core import tensor_parallel

            return tensor_parallel.checkpoint(self.ffn, False, x, c, temb)
        return self.ffn(x, c, temb)

    def ffn(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        """The unit that selective recompute checkpoints (docs/model.md, "Recompute")."""
        x, c = maybe_clamp(x, self.training), maybe_clamp(c, self.training)
        xn, cn, gate, enc_gate = self.norm2(x, c, temb)
        if cn is None:  # final block without text params
            return gated_add(x, gate, self.ff(xn)), c
        if self.ff_enc is not None:
            return gated_add(x, gate, self.ff(xn)), gated_add(c, enc_gate, self.ff_enc(cn))
        # Shared FFN over [x; c] (token-wise, so also correct on SP shards: per rank [x_r; c_r]).
        y = self.ff(torch.cat([xn, cn]))
        return gated_add(x, gate, y[:x.shape[0]]), gated_add(c, enc_gate, y[x.shape[0]:])

