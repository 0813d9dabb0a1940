"""Per-device memory and FLOPs of one SparseUMMDiT training step, derived from the model's structure.

`plan_memory` is a pure function of the model config, parallel sizes, shapes, recompute mode, dtypes and
optimizer settings; it reads no flags and touches no device, so the planner CLI (`tools/plan.py`), `pretrain.py
--plan` and the tests share it.

Activations are what autograd keeps for backward: the code below walks one block the way its forward runs
(`models/predictor/modules.py`) and records each tensor an op saves (layer_norm: input, mean, rstd; mul: both
operands; gelu: its input; the parallel linears: their local input; SDPA: q, k, v, output, logsumexp, mask),
by name, so a tensor saved by two ops counts once and a cast to the dtype a tensor already has is no copy. The
fp32 "islands" (norms, RoPE, modulation, gated residuals) therefore cost the same in bf16 and fp32 training.
Sequence lengths are per rank: divided by CP (context parallel), and by TP between the linears under sequence
parallelism. `tests/unit/test_memory_plan.py` checks the figures against `saved_tensors_hooks` and the real
optimizer within 15%.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config.predictor import PredictorConfig, RecomputeConfig
from .flops import predictor_forward_flops, predictor_training_flops

FP32 = 4
GIB = 1024 ** 3


@dataclass(frozen=True)
class Workload:
    """One micro-batch: latent grid (frames, height, width in latent pixels, i.e. video / VAE factors)."""

    micro_batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_len: int = 512

    @classmethod
    def from_video(cls, micro_batch: int, frames: int, height: int, width: int, text_len: int = 512,
                   vae_factors: tuple[int, int, int] = (8, 8, 8)) -> "Workload":
        ft, fh, fw = vae_factors
        return cls(micro_batch, (frames - 1) // ft + 1, height // fh, width // fw, text_len)


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


@dataclass(frozen=True)
class OptimizerPlan:
    """Megatron's optimizer wrappers: fp32 master copy for bf16 params, Adam moments, our EMA; sharded over
    DP x CP by the distributed optimizer. `FusedEmaAdamW` (every `--optimizer-selection`) allocates the EMA even
    at decay 0; `ema=False` plans a plain AdamW."""

    distributed: bool = False
    ema: bool = True


@dataclass(frozen=True)
class EncoderPlan:
    """Frozen encoders' weights on every rank (params x bytes); zero when features are loaded from a cache."""

    vae_params: int = 0
    vae_bytes: int = FP32
    text_params: int = 0
    text_bytes: int = 2


@dataclass(frozen=True)
class TrainablePlan:
    """What trains. Default: every predictor parameter. LoRA (`lora_r` on `lora_targets`): the adapters train, the
    base is frozen (weights only; activations as for full training: the adapters' inputs and the path back to them
    are kept).
    Distillation adds teacher forwards without autograd, `teacher_passes` per micro-batch of `teacher_rows` x the
    micro-batch each (2: cond and uncond), and for a full-weight student (`teacher_copy`) a frozen teacher copy of
    the weights next to the trained student."""

    lora_r: Optional[int] = None
    lora_targets: tuple[str, ...] = ()
    teacher_passes: int = 0
    teacher_rows: int = 2
    teacher_copy: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    grads: int
    optimizer: int
    activations: int
    encoders: int
    workspace: int
    params_local: int
    model_flops: float       # per micro-batch and device (3x forward + distillation's teacher forwards)
    hardware_flops: float    # with the recomputed forward

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.encoders + self.workspace


# ----------------------------------------------------------------------------------------------------------------
# Parameters: counted on a meta-device build, split per TP rank by the checkpoint layout rule
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _param_numels(cfg: PredictorConfig) -> tuple[tuple[int, bool], ...]:
    """(merged numel, split over TP) per parameter, from a meta-device build (built at the TP megatron is
    initialised with, if it is: its split keys hold 1/TP of the merged tensor)."""
    from ..models.predictor import SparseUMMDiT
    from ..models.predictor.tp_layout import tp_split_dim

    with torch.device("meta"):
        model = SparseUMMDiT(cfg)
    built_tp = model.ctx.tp_size
    out = []
    for name, p in model.named_parameters():
        split = tp_split_dim(name) is not None
        out.append((p.numel() * (built_tp if split else 1), split))
    return tuple(out)


def local_param_count(cfg: PredictorConfig, tp: int) -> int:
    """Parameters one TP rank holds: split keys (`tp_layout.tp_split_dim`) / TP, replicated keys whole."""
    cfg.validate_parallel(tp)
    return sum(n // tp if split else n for n, split in _param_numels(cfg))


def static_bytes(params: int, param_bytes: int, opt: OptimizerPlan, shard: int) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes: megatron DDP keeps fp32 main grads; the optimizer an fp32 master copy
    (only for non-fp32 params), exp_avg, exp_avg_sq and, with our FusedEmaAdamW, the fp32 EMA."""
    per_param = FP32 * (2 + int(opt.ema) + int(param_bytes != FP32))
    optimizer = params * per_param // (shard if opt.distributed else 1)
    return params * param_bytes, params * FP32, optimizer


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------


class _Saved:
    """Distinct tensors kept for backward, by name -> bytes."""

    def __init__(self, act_bytes: int):
        self.a = act_bytes
        self.tensors: dict[str, int] = {}

    def save(self, name: str, numel: int, nbytes: int) -> str:
        self.tensors.setdefault(name, numel * nbytes)
        return name

    def fp32(self, name: str, numel: int, src_bytes: int) -> str:
        """Keep `t.float()`: `t` itself when already fp32, else a new fp32 copy."""
        return self.save(name if src_bytes == FP32 else name + ".f32", numel, FP32)

    def total(self) -> int:
        return sum(self.tensors.values())


@dataclass(frozen=True)
class _Shapes:
    """Per-rank token counts of one block (batch folded in later) and widths.

    Ulysses CP (`parallel/context_parallel.py`): the video residual stream is split over CP (then over TP under
    SP); each attention sees the full video sequence with heads / (TP x CP); text is replicated over CP."""

    b: int
    cp: int
    video: int          # video tokens attention sees (full sequence)
    text: int
    res_video: int      # residual-stream tokens per rank (/CP, and /TP under SP)
    res_text: int       # (/TP under SP)
    pad_video: int      # column-linear output length per CP rank (padded to a multiple of TP under SP)
    pad_text: int
    attn_video: int     # video length after the all-to-all, with the CP padding
    d: int              # hidden size
    d_local: int        # linear output width: hidden / TP
    d_attn: int         # attention width: hidden / (TP x CP)
    heads_attn: int
    embed: int


def _shapes(cfg: PredictorConfig, work: Workload, par: Parallel) -> _Shapes:
    p = cfg.patch_size
    video = work.latent_frames * (work.latent_height // p) * (work.latent_width // p)
    shard = par.tp if par.sp else 1
    res_v, res_t = math.ceil(video / (par.cp * shard)), math.ceil(work.text_len / shard)
    return _Shapes(b=work.micro_batch, cp=par.cp, video=video, text=work.text_len, res_video=res_v,
                   res_text=res_t, pad_video=res_v * shard, pad_text=res_t * shard,
                   attn_video=res_v * shard * par.cp if par.cp > 1 else res_v * shard, d=cfg.hidden_size,
                   d_local=cfg.hidden_size // par.tp, d_attn=cfg.hidden_size // (par.tp * par.cp),
                   heads_attn=cfg.num_heads // (par.tp * par.cp), embed=cfg.timestep_embed_dim)


def _ada_norm(s: _Saved, sh: _Shapes, tag: str, streams: list[tuple[str, int]], param_bytes: int) -> None:
    """AdaNormZero: SiLU(temb) -> linear -> fp32 chunks; per stream LN (fp32 input, mean, rstd), LN output in
    fp32 times (1 + scale); the modulated output (activation dtype) is what the next linears save."""
    a, b, d = s.a, sh.b, sh.d
    s.save(f"{tag}.silu", b * sh.embed, a)
    s.save(f"{tag}.mod", b * 6 * d, FP32)
    for stream, tokens in streams:
        n = b * tokens
        s.fp32(f"in.{stream}", n * d, a)
        s.save(f"{tag}.{stream}.stats", 2 * n, FP32)
        s.save(f"{tag}.{stream}.y", n * d, FP32)
        s.save(f"{tag}.{stream}.scale", b * d, FP32)
        if param_bytes != FP32:
            s.save(f"{tag}.{stream}.ln_w", 2 * d, FP32)
        s.save(f"{tag}.{stream}.out", n * d, a)


def _qk_norm(s: _Saved, sh: _Shapes, name: str, tokens: int, raw_numel: int) -> None:
    """HeadRMSNorm: fp32 input (pow and mul keep it; in fp32 that is the storage the heads were cut from,
    `raw_numel` elements), rsqrt, normalised output in the activation dtype (kept by `* weight`). RoPE after it
    keeps nothing per block: its muls by the constant cos/sin tables keep only them."""
    a, n_out = s.a, sh.b * tokens * sh.d_attn
    if a == FP32:
        s.save(f"{name}.raw", sh.b * raw_numel, a)
    else:
        s.save(f"{name}.f32", n_out, FP32)
    s.save(f"{name}.rsqrt", sh.b * tokens * sh.heads_attn, FP32)
    s.save(f"{name}.normed", n_out, a)


def _attention(s: _Saved, sh: _Shapes, tag: str, k: int, group: bool, text_out: bool) -> None:
    """Joint attention: q/k norms, the kernel's saved [video; text] q, k, v, output (text repeated k times,
    video padded to a multiple of k^2), logsumexp and mask; the output projections' inputs."""
    a, b = s.a, sh.b
    for proj in ("q", "k"):
        # video heads come from the column output (CP=1) or the all-to-all's output (CP>1); text heads are a
        # slice of the column output's heads
        _qk_norm(s, sh, f"{tag}.{proj}x", sh.video, sh.attn_video * sh.d_attn)
        _qk_norm(s, sh, f"{tag}.{proj}c", sh.text, sh.pad_text * sh.d_local)
    video_k = -(-sh.video // (k * k)) * k * k if k > 1 else sh.video
    rows = b * (video_k + k * sh.text)
    for t in ("q", "k", "v", "out"):
        s.save(f"{tag}.sdpa.{t}", rows * sh.d_attn, a)
    s.save(f"{tag}.sdpa.lse", rows * sh.heads_attn, FP32)
    s.save(f"{tag}.sdpa.mask", b * k * (video_k // k + sh.text), a)
    # The output projections read views of the kernel output unless a regroup, padding or CP exchange copied it.
    if sh.cp > 1 or sh.pad_video * sh.cp != sh.video:
        s.save(f"{tag}.to_out.in", b * sh.pad_video * sh.d_local, a)
    elif group:
        s.save(f"{tag}.to_out.in", b * video_k * sh.d_local, a)
    if text_out and (k > 1 or sh.cp > 1 or sh.pad_text != sh.text):
        s.save(f"{tag}.to_add_out.in", b * sh.pad_text * sh.d_local, a)


def _gated_residual(s: _Saved, sh: _Shapes, tag: str, stream: str, tokens: int) -> None:
    """x + gate * y in fp32: the mul keeps gate (a view of the fp32 modulation) and y in fp32."""
    s.save(f"{tag}.{stream}.y32", sh.b * tokens * sh.d, FP32)


def _ffn(s: _Saved, sh: _Shapes, tag: str, pad_tokens: int) -> None:
    """Column linear (keeps its local input, counted by the norm), GELU on an fp32 copy, row linear input."""
    n = sh.b * pad_tokens * 4 * sh.d_local
    s.save(f"{tag}.h32", n, FP32)
    s.save(f"{tag}.h", n, s.a)


def _ffn_half(s: _Saved, sh: _Shapes, tag: str, text_out: bool, double_ff: bool, param_bytes: int) -> None:
    streams = [("x1", sh.res_video)] + ([("c1", sh.res_text)] if text_out else [])
    _ada_norm(s, sh, f"{tag}.norm2", streams, param_bytes)
    if not text_out or double_ff:
        _ffn(s, sh, f"{tag}.ff", sh.pad_video)
        _gated_residual(s, sh, tag + ".ff", "x", sh.res_video)
        if text_out:
            _ffn(s, sh, f"{tag}.ff_enc", sh.pad_text)
            _gated_residual(s, sh, tag + ".ff", "c", sh.res_text)
        return
    s.save(f"{tag}.ff.cat", sh.b * (sh.res_video + sh.res_text) * sh.d, s.a)
    _ffn(s, sh, f"{tag}.ff", sh.pad_video + sh.pad_text)
    _gated_residual(s, sh, tag + ".ff", "xc", sh.res_video + sh.res_text)


def block_saved_bytes(sh: _Shapes, k: int, group: bool, text_out: bool, double_ff: bool, mode: str,
                      act_bytes: int, param_bytes: int) -> int:
    """Bytes one block keeps for backward; `mode` is "none", "ffn" (selective) or "full"."""
    s = _Saved(act_bytes)
    b, d = sh.b, sh.d
    if mode == "full":  # megatron's checkpoint keeps only the block inputs
        s.save("in.x", b * sh.res_video * d, act_bytes)
        s.save("in.c", b * sh.res_text * d, act_bytes)
        return s.total()
    _ada_norm(s, sh, "norm1", [("x", sh.res_video), ("c", sh.res_text)], param_bytes)
    _attention(s, sh, "attn", k, group, text_out)
    _gated_residual(s, sh, "attn", "x", sh.res_video)
    if text_out:
        _gated_residual(s, sh, "attn", "c", sh.res_text)
    if mode == "ffn":
        s.save("x1", b * sh.res_video * d, act_bytes)
        s.save("c1", b * sh.res_text * d, act_bytes)
    else:
        _ffn_half(s, sh, "b", text_out, double_ff, param_bytes)
    return s.total()


def _outside_blocks(cfg: PredictorConfig, work: Workload, sh: _Shapes, act_bytes: int) -> int:
    """Patch embedding input, caption projection input, conditioning MLPs, skip fusions, output head."""
    a, b, d, e = act_bytes, sh.b, sh.d, sh.embed
    latent = b * cfg.patch_embed_channels * work.latent_frames * work.latent_height * work.latent_width
    total = latent * a + b * work.text_len * cfg.caption_channels * a
    total += b * (6 * e + cfg.pooled_projection_dim) * FP32  # sinusoid, MLP inputs, temb
    if cfg.skip_connection:
        width = 2 * d * (b * (sh.res_video + sh.res_text))
        per_skip = width * a if cfg.skip_connection_zero_init else width * (FP32 + a)
        total += len(cfg.num_layers) // 2 * per_skip
    n = b * sh.res_video * d
    total += 3 * n * FP32 + 4 * b * sh.res_video * FP32 + b * sh.video * d * a  # norm_final, norm_out, proj_out
    return total


def _scatter_slice_excess(sh: _Shapes, act_bytes: int) -> int:
    """megatron's SP scatter returns a slice (a view) of the full sequence when that is contiguous in (seq,
    batch, hidden): after the TP padding (a cat) or with batch 1; a first block that keeps its input then keeps
    the whole storage. Otherwise the slice is copied."""
    excess = 0
    for tokens, res, pad in ((sh.video, sh.res_video, sh.pad_video), (sh.text, sh.res_text, sh.pad_text)):
        if sh.b == 1 or pad != tokens:
            excess += sh.b * (pad - res) * sh.d * act_bytes
    return excess


def _block_layout(cfg: PredictorConfig) -> list[tuple[int, bool, bool]]:
    """(sparsity k, group skip, has text outputs) of every block in execution order."""
    sparse = cfg.sparse_n if cfg.sparse1d else (1,) * len(cfg.num_layers)
    out = []
    last = len(cfg.num_layers) - 1
    for s, (n, k) in enumerate(zip(cfg.num_layers, sparse)):
        for i in range(n):
            final = s == last and i == n - 1
            out.append((k, k > 1 and i % 2 == 1, not final or cfg.final_block_text_params))
    return out


def _block_mode(recompute: RecomputeConfig, layer_idx: int) -> str:
    if recompute.full_block(layer_idx):
        return "full"
    return "ffn" if recompute.ffn_only(layer_idx) else "none"


def activation_bytes(cfg: PredictorConfig, work: Workload, par: Parallel, recompute: RecomputeConfig,
                     act_bytes: int, param_bytes: int) -> tuple[int, int]:
    """(saved bytes of the whole forward, largest recomputed unit re-materialised in backward)."""
    sh = _shapes(cfg, work, par)
    total, recomputed = _outside_blocks(cfg, work, sh, act_bytes), 0
    if par.sp and (act_bytes == FP32 or _block_mode(recompute, 1) == "full"):
        total += _scatter_slice_excess(sh, act_bytes)
    for idx, (k, group, text_out) in enumerate(_block_layout(cfg), start=1):
        mode = _block_mode(recompute, idx)
        kept = block_saved_bytes(sh, k, group, text_out, cfg.double_ff, mode, act_bytes, param_bytes)
        total += kept
        if mode != "none":
            full = block_saved_bytes(sh, k, group, text_out, cfg.double_ff, "none", act_bytes, param_bytes)
            recomputed = max(recomputed, full - kept)
    return total, recomputed


def _workspace(sh: _Shapes, recomputed: int, par: Parallel, act_bytes: int) -> int:
    """Transient peak on top of the saved tensors: the recomputed unit, the FFN hidden gradient (fp32 GELU
    backward plus its activation-dtype copy) and, under SP, one all-gathered input."""
    hidden = sh.b * sh.pad_video * 4 * sh.d_local * (FP32 + act_bytes)
    gather = sh.b * sh.pad_video * sh.d * act_bytes if par.sp else 0
    return recomputed + hidden + gather


@functools.lru_cache(maxsize=32)
def adapter_param_count(cfg: PredictorConfig, tp: int, r: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters one TP rank holds: per adapted linear A (r x in) and B (out x r), split like the base
    (`models.lora`: a column-parallel base splits B's rows, a row-parallel one A's columns)."""
    from ..models.lora import resolve_targets
    from ..models.predictor import SparseUMMDiT
    from ..models.predictor.tp_layout import tp_split_dim

    cfg.validate_parallel(tp)
    with torch.device("meta"):
        model = SparseUMMDiT(cfg)
    total = 0
    for name in resolve_targets(model, targets):
        out_features, in_features = model.get_submodule(name).weight.shape
        split = tp_split_dim(f"{name}.weight")
        total += r * (in_features // tp if split == 1 else in_features)
        total += r * (out_features // tp if split == 0 else out_features)
    return total


def _teacher_bytes(cfg: PredictorConfig, work: Workload, par: Parallel, rows: int, act_bytes: int) -> int:
    """Transient peak of a teacher forward without autograd: at most one block's tensors at a time (bounded by
    everything the largest block would save) at `rows` x the micro-batch, and its FFN hidden."""
    sh = _shapes(cfg, dataclasses.replace(work, micro_batch=work.micro_batch * rows), par)
    block = max(block_saved_bytes(sh, k, group, text_out, cfg.double_ff, "none", act_bytes, act_bytes)
                for k, group, text_out in _block_layout(cfg))
    return block + _workspace(sh, 0, par, act_bytes)


def plan_memory(cfg: PredictorConfig, work: Workload, par: Parallel, recompute: RecomputeConfig,
                act_dtype: torch.dtype = torch.bfloat16, opt: OptimizerPlan = OptimizerPlan(),
                encoders: EncoderPlan = EncoderPlan(), trainable: TrainablePlan = TrainablePlan()) -> MemoryPlan:
    """Per-device bytes of one training micro-batch step and its FLOPs (see the module docstring)."""
    a = torch.empty((), dtype=act_dtype).element_size()
    params = local_param_count(cfg, par.tp)
    lora = trainable.lora_r is not None
    trained = adapter_param_count(cfg, par.tp, trainable.lora_r, trainable.lora_targets) if lora else params
    weights, grads, optimizer = static_bytes(trained, a, opt, par.dp * par.cp)
    weights += (int(lora) + int(trainable.teacher_copy)) * params * a  # the frozen base; a full student's teacher
    acts, recomputed = activation_bytes(cfg, work, par, recompute, a, a)
    sh = _shapes(cfg, work, par)
    workspace = _workspace(sh, recomputed, par, a)
    if trainable.teacher_passes:  # before the student's forward: its peak sits on the static memory alone
        workspace = max(workspace, _teacher_bytes(cfg, work, par, trainable.teacher_rows, a) - acts)
    enc = encoders.vae_params * encoders.vae_bytes + encoders.text_params * encoders.text_bytes
    thw = (work.latent_frames, work.latent_height, work.latent_width)
    model_flops = predictor_training_flops(cfg, work.micro_batch, thw, work.text_len)
    teacher = trainable.teacher_passes * predictor_forward_flops(cfg, work.micro_batch * trainable.teacher_rows, thw,
                                                                 work.text_len)
    hardware = model_flops * (1 + _recompute_flop_fraction(cfg, recompute) / 3) + teacher
    return MemoryPlan(weights=weights, grads=grads, optimizer=optimizer, activations=acts, encoders=enc,
                      workspace=workspace, params_local=params, model_flops=(model_flops + teacher) / (par.tp * par.cp),
                      hardware_flops=hardware / (par.tp * par.cp))


# What a device needs beyond the planned peak (`headroom`): the accelerator runtime's own context and the
# collective library's buffers (a fixed allowance), and a share of the memory that comes and goes every step.
CONTEXT_BYTES = GIB
FRAGMENTATION_SHARE = 0.05


def headroom(plan: MemoryPlan) -> int:
    """Bytes to keep free on top of `plan.total` for the runtime and the caching allocator.

    The planned total is what live tensors hold at the peak. A caching allocator reserves more: a freed block of
    one transient (the recomputed unit, the FFN hidden gradient, the SP gather buffer) is kept in its cache and
    cannot always serve the next transient of another size, so one more workspace may stay reserved; and
    rounding/splitting of the many activation-sized blocks costs a share of the activations and workspace. Plus
    the runtime context. The rule is derived from the plan, not measured (no CUDA measurement exists yet)."""
    dynamic = plan.activations + plan.workspace
    return CONTEXT_BYTES + plan.workspace + int(FRAGMENTATION_SHARE * dynamic)


def fits(plan: MemoryPlan, device_bytes: float) -> bool:
    """Whether the planned peak plus its `headroom` stays within one device's memory."""
    return plan.total + headroom(plan) <= device_bytes


def _recompute_flop_fraction(cfg: PredictorConfig, recompute: RecomputeConfig) -> float:
    """Share of one forward that backward recomputes: whole blocks, or the FFN half (2/3 of a block's linear
    FLOPs: FFN 16 d^2 of 24 d^2 per token, attention scores ignored)."""
    n = sum(cfg.num_layers)
    full = sum(recompute.full_block(i) for i in range(1, n + 1))
    ffn = sum(recompute.ffn_only(i) and not recompute.full_block(i) for i in range(1, n + 1))
    return (full + ffn * 2 / 3) / n


__all__ = ["EncoderPlan", "GIB", "MemoryPlan", "OptimizerPlan", "Parallel", "TrainablePlan", "Workload",
           "activation_bytes", "adapter_param_count", "block_saved_bytes", "fits", "headroom", "local_param_count", "plan_memory", "static_bytes"]
