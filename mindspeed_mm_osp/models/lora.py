"""LoRA adapters on the predictor's linear layers, applied from outside the model after it is built.

`apply_lora(model, config)` replaces each targeted linear by a `LoRALinear` that keeps the original layer as
`base` (frozen) and adds `scaling * B @ A` in its own forward, sharded like the base so that TP=2 equals TP=1:

| base layer | A (r x in) | B (out x r) | collective on the r-wide intermediate h = A x |
|---|---|---|---|
| ColumnParallelLinear, SP | replicated, `sequence_parallel` | rows split (dim 0) | all-gather the sequence |
| ColumnParallelLinear, no SP | replicated | rows split (dim 0) | identity forward, all-reduce backward |
| RowParallelLinear, SP | columns split (dim 1) | replicated, `sequence_parallel` | reduce-scatter the sequence |
| RowParallelLinear, no SP | columns split (dim 1) | replicated | all-reduce |
| replicated nn.Linear | replicated | replicated | none; tags copied from the base weight |

The collectives move r features per token instead of the layer width (r << width). A replicated adapter that
only sees this rank's tokens is tagged `sequence_parallel=True` so `finalize_model_grads` sums its grad over
TP (docs/optimizer.md, "Inside megatron"); split adapters carry megatron's `tensor_model_parallel` attributes so the
grad norm counts them on every rank. B starts at zero (the model is the base at step 0); A's init depends only
on (seed, module name), never on the TP size or rank.

State-dict keys of the adapters are `<module>.lora_A` / `<module>.lora_B` (`<module>` is the base layer's name,
e.g. `transformer_blocks.0.0.attn1.to_q`); `tp_layout.tp_split_dim` knows how they split, so the checkpoint
converter merges and splits them like any other key. `merge_lora` folds them into a merged base state dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import zlib
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.lora import ALL_LINEARS, LoRAConfig
from .predictor.modules import LocalLinear
from .predictor.tp_layout import ADAPTER_KEY

_BLOCK_PREFIX = re.compile(r"^transformer_blocks\.\d+\.\d+\.")


def _parallel_linears() -> tuple[type, type]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def _kind(module: nn.Module) -> Optional[str]:
    """'column', 'row', 'local' (TP=1 stand-in, returns (y, None)), 'linear' (plain nn.Linear) or None."""
    column, row = _parallel_linears()
    if isinstance(module, column):
        return "column"
    if isinstance(module, row):
        return "row"
    if isinstance(module, LocalLinear):
        return "local"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _features(base: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) of the full (unsharded) layer."""
    if kind in ("column", "row"):
        return base.input_size, base.output_size
    return base.in_features, base.out_features


class LoRALinear(nn.Module):
    """`base(x) + scaling * B(A(dropout(x)))` with A/B sharded like `base` (see the module docstring)."""

    def __init__(self, base: nn.Module, name: str, config: LoRAConfig, tp_rank: int, tp_size: int,
                 scale: float = 1.0):
        super().__init__()
        kind = _kind(base)
        if kind is None:
            raise TypeError(f"{name}: {type(base).__name__} is not a linear layer LoRA can adapt")
        self.base = base
        self.kind = kind
        self.tp_size = tp_size
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and tp_size > 1
        self.scaling = config.scaling * scale
        self.dropout = config.dropout
        self.enabled = True  # `adapters_disabled` turns the adapter off: the layer is its base
        fan_in, fan_out = _features(base, kind)
        weight = base.weight
        g = torch.Generator().manual_seed(config.init_seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = fan_in ** -0.5  # nn.Linear's default init (kaiming_uniform, a=sqrt(5)) on the full A
        a = torch.empty(config.r, fan_in).uniform_(-bound, bound, generator=g)
        if kind == "row":
            a = a.chunk(tp_size, dim=1)[tp_rank]
        out_local = fan_out // tp_size if kind == "column" else fan_out
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_local, config.r, device=weight.device, dtype=weight.dtype))
        self._set_parallel_attributes(weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (the model reads `.weight.dtype` of its linears)."""
        return self.base.weight

    def _set_parallel_attributes(self, base_weight: torch.Tensor) -> None:
        if self.kind in ("local", "linear"):
            if getattr(base_weight, "sequence_parallel", False):
                self.lora_A.sequence_parallel = self.lora_B.sequence_parallel = True
            return
        if self.tp_size == 1:
            return
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        split, replicated, dim = ((self.lora_B, self.lora_A, 0) if self.kind == "column"
                                  else (self.lora_A, self.lora_B, 1))
        set_tensor_model_parallel_attributes(split, True, dim, 1)
        if self.sequence_parallel:
            replicated.sequence_parallel = True

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return x
        sharded_input = self.kind == "row" or (self.kind == "column" and self.sequence_parallel)
        if self.tp_size > 1 and sharded_input:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():  # this rank's slice: a TP-distinct mask
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution, laid out like the base output on this rank."""
        h = F.linear(self._dropout(x).to(self.lora_A.dtype), self.lora_A)
        if self.tp_size > 1 and self.kind in ("column", "row"):
            from megatron.core import tensor_parallel as tp

            if self.kind == "column":
                h = (tp.gather_from_sequence_parallel_region(h) if self.sequence_parallel
                     else tp.copy_to_tensor_model_parallel_region(h))
            else:
                h = (tp.reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel
                     else tp.reduce_from_tensor_model_parallel_region(h))
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor):
        out = self.base(x)
        if not self.enabled:
            return out
        if self.kind == "linear":
            return out + self.delta(x).to(out.dtype)
        y, bias = out
        return y + self.delta(x).to(y.dtype), bias


# ---------------------------------------------------------------------------------------------------------------
# Applying, reading and writing adapters
# ---------------------------------------------------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    """Adaptable linears, in model order. Not the text-only linears of the final block (text query projection,
    text output projection, text FFN): the predictor discards the final text stream, so their adapters would
    never get a gradient (and would only decay)."""
    final_block = model.blocks()[-1]
    final = next(n for n, m in model.named_modules() if m is final_block)

    def discarded(name: str) -> bool:
        return name in (f"{final}.attn1.add_q_proj", f"{final}.attn1.to_add_out") or name.startswith(
            f"{final}.ff_enc.")

    return [n for n, m in model.named_modules()
            if n and _kind(m) is not None and not isinstance(m, LoRALinear) and not discarded(n)]


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Qualified names of the linears matched by `targets` (a name or a dotted suffix of one; `all`: every one).

    Unknown names raise a ValueError with did-you-mean suggestions and the targetable block-level names.
    """
    names = _linear_names(model)
    if ALL_LINEARS in targets:
        return names
    chosen, unknown = [], []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            unknown.append(target)
        chosen += [n for n in hits if n not in chosen]
    if unknown:
        suffixes = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
        short = sorted({_BLOCK_PREFIX.sub("", n) for n in names})
        hints = []
        for target in unknown:
            close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.6)
            hints.append(f"{target!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(f"--lora-target-modules: no linear layer of the predictor is named {', '.join(hints)}; "
                         f"targetable names: {' '.join(short)}")
    return [n for n in names if n in chosen]  # model order


def apply_lora(model: nn.Module, config: LoRAConfig, scale: float = 1.0) -> list[str]:
    """Freeze every parameter of `model`, wrap the targeted linears in `LoRALinear`; returns their names.

    Call after the base weights are loaded and before the megatron DDP wrap (DDP and the optimizer then see
    only the adapters). `scale` multiplies `config.scaling` (inference `--lora-scale`).
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    ctx = getattr(model, "ctx", None)
    tp_rank, tp_size = (ctx.tp_rank, ctx.tp_size) if ctx is not None else (0, 1)
    names = resolve_targets(model, config.target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), name, config, tp_rank, tp_size, scale))
    recompute = getattr(model, "recompute", None)
    if recompute is not None and (recompute.num_layers or recompute.selective_ffn_layers):
        _streams_require_grad(model)
    return names


def _streams_require_grad(model: nn.Module) -> None:
    """Megatron's (reentrant) recompute backpropagates into a checkpointed block only when one of its inputs
    requires grad. With a frozen base nothing upstream of the first adapter does, so the adapters of recomputed
    blocks would silently get no gradient (tested): make the predictor's three input streams require grad."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)  # a leaf: a frozen module applied to inputs without grad
        return output

    for name in ("patch_embed", "caption_projection", "time_text_embed"):
        model.get_submodule(name).register_forward_hook(hook)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as its frozen base inside the block (distillation's teacher pass shares the student's one copy
    of the base weights). Every TP rank must enter it together: the adapters' collectives are skipped."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError("adapters_disabled: the model has no LoRA adapters")
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.enabled = True


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (`<module>.lora_A/B`), detached CPU copies."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A"] = module.lora_A.detach().cpu().clone()
        out[f"{name}.lora_B"] = module.lora_B.detach().cpu().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy this rank's adapter tensors into `model`; key sets and shapes must match exactly."""
    params = {f"{n}.lora_{w}": getattr(m, f"lora_{w}") for n, m in lora_modules(model).items() for w in "AB"}
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(p.shape)}"
              for k, p in params.items() if k in state_dict and state_dict[k].shape != p.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: adapters do not fit this model (other --lora-target-modules or --lora-r?): "
                         f"missing {missing[:6]} ({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)}), "
                         f"shape mismatches {shapes[:4]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state_dict[key].to(device=param.device, dtype=param.dtype))


def merge_lora(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scaling: float) -> dict:
    """Merged (TP=1 view) base state dict with `scaling * B @ A` folded into each adapted `<module>.weight`.

    The sum is computed in fp32 and stored in the base weight's dtype. Adapter keys without a base weight raise.
    """
    merged = dict(base)
    modules = sorted({m.group("module") for m in map(ADAPTER_KEY.match, adapters) if m})
    if len(modules) * 2 != len(adapters):
        odd = sorted(k for k in adapters if not ADAPTER_KEY.match(k))
        raise ValueError(f"adapter state dict has keys that are not <module>.lora_A/B pairs: {odd[:6]}")
    for module in modules:
        key = f"{module}.weight"
        if key not in merged:
            raise ValueError(f"adapter {module}.lora_A/B has no base weight {key} to merge into")
        a, b = adapters[f"{module}.lora_A"].float(), adapters[f"{module}.lora_B"].float()
        w = merged[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"{module}: B @ A is {(b.shape[0], a.shape[1])}, the base weight {tuple(w.shape)}")
        merged[key] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Identity of the base an adapter was trained on
# ---------------------------------------------------------------------------------------------------------------


def lora_metadata(config: LoRAConfig, predictor_config) -> dict:
    """What an adapter checkpoint records: its LoRA config and the predictor config of its base."""
    def plain(dc) -> dict:  # lists, not tuples: the JSON config loader reads it back
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(dc).items()}

    return {"config": plain(config), "base": plain(predictor_config)}


def check_base(metadata: Mapping, predictor_config, source: str) -> LoRAConfig:
    """The recorded LoRAConfig, after checking that the adapters were trained on a base of this config.

    Raises a ValueError naming every differing predictor field (`from_pretrained`, a path, is not compared).
    """
    _require_same_base(metadata["base"], dataclasses.asdict(predictor_config), source)
    return recorded_config(metadata)


def recorded_config(metadata: Mapping) -> LoRAConfig:
    values = dict(metadata["config"])
    values["target_modules"] = tuple(values["target_modules"])
    return LoRAConfig(**values)


def check_base_weights(metadata: Mapping, base: Mapping[str, torch.Tensor], source: str) -> None:
    """Check a merged base state dict against the base config the adapters record (keys and shapes of a model
    built on `meta` from that config); raises a ValueError naming the first differences."""
    from ..config import from_dict
    from ..config.predictor import PredictorConfig
    from .predictor import SparseUMMDiT, has_final_block_text_params

    cfg = from_dict(PredictorConfig, dict(metadata["base"]))
    cfg = dataclasses.replace(cfg, final_block_text_params=has_final_block_text_params(base, cfg))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SparseUMMDiT(cfg).state_dict().items()
                    if not k.endswith("_extra_state")}
    got = {k: tuple(v.shape) for k, v in base.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [f"{k}: base {got[k]}, adapters' base {expected[k]}" for k in expected
              if k in got and got[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: the base weights are not the model the adapters were trained on "
                         f"(hidden_size {cfg.hidden_size}, num_layers {list(cfg.num_layers)}): shape mismatches "
                         f"{shapes[:4]} ({len(shapes)}), missing {missing[:4]} ({len(missing)}), unexpected "
                         f"{unexpected[:4]} ({len(unexpected)})")


def check_resumable(recorded: Mapping, current: Mapping, source: str) -> None:
    """Both `lora_metadata`: same base config (`check_base`), same LoRA config and (distillation) the same student
    schedule, else a ValueError naming the differing fields."""
    _require_same_base(recorded["base"], current["base"], source)
    diffs = _differences(recorded["config"], current["config"], ("checkpoint", "this run"))
    if diffs:
        raise ValueError(f"{source}: adapters of another LoRA config ({diffs}); resume with the checkpoint's "
                         "--lora-* flags")
    diffs = _differences(recorded.get("distill") or {}, current.get("distill") or {}, ("checkpoint", "this run"))
    if diffs:
        raise ValueError(f"{source}: adapters of another distillation ({diffs}); resume with the checkpoint's "
                         "--distill* flags")


def _require_same_base(recorded: Mapping, current: Mapping, source: str) -> None:
    diffs = _differences(recorded, current, ("adapters", "base"), ignore=("from_pretrained",))
    if diffs:
        raise ValueError(f"{source}: the adapters were trained on another base model; differing predictor "
                         f"config: {diffs}")


def _differences(a: Mapping, b: Mapping, labels: tuple[str, str], ignore: tuple[str, ...] = ()) -> str:
    def plain(value):
        return list(value) if isinstance(value, (tuple, list)) else value

    fields = sorted((set(a) | set(b)) - set(ignore))
    return "; ".join(f"{f}: {labels[0]} {a.get(f)!r}, {labels[1]} {b.get(f)!r}" for f in fields
                     if plain(a.get(f)) != plain(b.get(f)))


__all__ = ["LoRALinear", "adapters_disabled", "apply_lora", "check_base", "check_base_weights", "check_resumable", "load_lora_state_dict",
           "lora_metadata", "lora_modules", "lora_state_dict", "merge_lora", "recorded_config", "resolve_targets"]
