"""megatron-core optimizer with FusedEmaAdamW inside, its LR schedule, and its state in model space.

`build_optimizer` builds megatron's optimizer the normal way (`get_megatron_optimizer`: param groups with
wd/lr multipliers, Float16 / FP32 / Distributed wrappers) and swaps each inner optimizer for `FusedEmaAdamW`
before the first step. megatron 0.16.1 has no hook for a custom inner class and its
own DistributedOptimizer checkpoint paths drop `ema_params`, share one `step` tensor or raise `KeyError: 'step'`,
so the state is moved in *model space* here instead (docs/optimizer.md, "Inside megatron"): one full fp32 tensor
per model parameter and key, gathered from / scattered to the DP shards. That makes optimizer checkpoints
independent of the DP size (a DP=2 save resumes at DP=1) and gives the fp32 EMA for export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import platform
from ..errors import UserError
from ..models.wrappers import unwrap
from .fused_ema_adamw import EMA_KEY, FusedEmaAdamW

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq", EMA_KEY, "step")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
_NOT_FLAGS = ("fused",)  # API-only settings


@dataclass(frozen=True)
class OptimizerSettings:
    """The Megatron flags the optimizer, schedule and clipping read (names follow `--flag-name`)."""

    lr: float = 1e-4                      # --lr (peak)
    min_lr: float = 0.0                   # --min-lr
    weight_decay: float = 0.01            # --weight-decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999             # --ema-decay
    bf16: bool = False
    use_distributed_optimizer: bool = False
    clip_grad: float = 1.0                # --clip-grad (0 disables clipping; ignored by the adaptive rule)
    clip_grad_ema_decay: float = 0.99     # --clip_grad_ema_decay (> 0: adaptive 3-sigma rule)
    max_consecutive_skips: int = 1        # stop after this many non-finite/extreme steps in a row
    train_iters: int = 1                  # --train-iters (default decay horizon)
    lr_warmup_iters: int = 0              # --lr-warmup-iters
    lr_warmup_fraction: Optional[float] = None  # --lr-warmup-fraction (of the decay iters; wins over iters)
    lr_warmup_init: float = 0.0           # --lr-warmup-init
    lr_decay_style: str = "constant"      # --lr-decay-style
    lr_decay_iters: Optional[int] = None  # --lr-decay-iters (default: train_iters)
    train_epochs: Optional[int] = None    # --train-epochs (when it set train_iters; named in resume errors)
    use_checkpoint_opt_param_scheduler: bool = False  # --use-checkpoint-opt_param-scheduler
    override_opt_param_scheduler: bool = False        # --override-opt_param-scheduler
    fused: Optional[bool] = None          # FusedEmaAdamW kernel; None: torch's fused kernel on CUDA/CPU

    @classmethod
    def from_args(cls, args, *, bf16: bool) -> "OptimizerSettings":
        """Settings from the validated `pretrain.py` flags (`training.args.TrainingArgs`).

        Fields named like a flag copy it; the rest translate Megatron's conventions: the EMA exists only with
        `--optimizer-selection fused_ema_adamw`, an unset `--clip_grad_ema_decay` is the static clip, and
        without warm-up the schedule starts at `--lr`. `bf16` is the predictor's resolved dtype.
        """
        translated = {
            "bf16": bf16,
            "ema_decay": args.ema_decay if args.optimizer_selection == "fused_ema_adamw" else 0.0,
            "clip_grad_ema_decay": args.clip_grad_ema_decay or 0.0,
            "lr_warmup_init": args.lr_warmup_init if args.lr_warmup_iters or args.lr_warmup_fraction else args.lr,
        }
        copied = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.name not in translated and f.name not in _NOT_FLAGS}
        return cls(**copied, **translated)

    def __post_init__(self) -> None:
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style={self.lr_decay_style!r}: expected one of {LR_DECAY_STYLES}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr={self.min_lr} must lie in [0, --lr={self.lr}]")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay={self.ema_decay} must lie in [0, 1]")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ValueError(f"--lr-warmup-fraction={self.lr_warmup_fraction} must lie in [0, 1)")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={self.max_consecutive_skips} must be >= 1")
        if self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                             "exclusive; keep one")


def build_optimizer(model_chunks: nn.Module | Sequence[nn.Module], settings: OptimizerSettings):
    """megatron `ChainedOptimizer` over megatron-DDP chunks, with `FusedEmaAdamW` as every inner optimizer.

    Clipping is left to `clip_and_step` (megatron's `clip_grad` is set to 0), so call that instead of `step()`.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        bf16=settings.bf16, params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer, clip_grad=0.0,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    for sub in _subs(optimizer):
        d = sub.optimizer.defaults
        # Only these kwargs: `defaults` holds `decoupled_weight_decay`, which AdamW.__init__ rejects.
        inner = FusedEmaAdamW([{"params": []}], lr=d["lr"], betas=d["betas"], eps=d["eps"],
                              weight_decay=d["weight_decay"], ema_decay=settings.ema_decay, fused=settings.fused)
        for group in sub.optimizer.param_groups:
            group.update({k: inner.defaults[k] for k in ("fused", "foreach", "ema_decay")})
            for key, value in inner.defaults.items():
                group.setdefault(key, value)
            # Megatron leaves this to the scheduler's first step; set it so the optimizer is right without one.
            group["weight_decay"] = d["weight_decay"] * group.get("wd_mult", 1.0)
        # Assigned, not passed to __init__, as megatron does: fp32 main shards are views (non-leaf tensors)
        # that `add_param_group` would reject. The groups stay the same dicts megatron's wrapper holds.
        inner.param_groups = sub.optimizer.param_groups
        inner.state.update(sub.optimizer.state)
        sub.optimizer = inner
    return optimizer


def build_lr_scheduler(optimizer, settings: OptimizerSettings):
    """megatron's `OptimizerParamScheduler` counted in iterations (call `.step(1)` after each successful update).

    Megatron semantics: decay over `--lr-decay-iters` (default `--train-iters`), warm-up over
    `--lr-warmup-fraction` x decay iters if given else `--lr-warmup-iters`, from `--lr-warmup-init` to `--lr`,
    then down to `--min-lr`; constant weight decay. `state_dict()`/`load_state_dict()` are megatron's.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = settings.lr_decay_iters or settings.train_iters
    warmup_iters = (int(settings.lr_warmup_fraction * decay_iters) if settings.lr_warmup_fraction is not None
                    else settings.lr_warmup_iters)
    if decay_iters <= 0 or warmup_iters >= decay_iters:
        raise UserError(f"LR warm-up ({warmup_iters} iters) must be shorter than the decay ({decay_iters} iters); "
                         "check --lr-warmup-iters/--lr-warmup-fraction, --lr-decay-iters and --train-iters")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=settings.lr_warmup_init, max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=warmup_iters, lr_decay_steps=decay_iters, lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=decay_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=settings.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=settings.override_opt_param_scheduler,
    )
    scheduler.flag_names = _schedule_flag_names(settings)
    return scheduler


# Megatron's scheduler state keys that `load_state_dict` requires to match (`num_steps` is the position).
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                 "wd_incr_steps", "wd_incr_style")


def _schedule_flag_names(settings: OptimizerSettings) -> dict[str, str]:
    """Each `SCHEDULE_KEYS` entry as the flag that set it in this run; a step count derived from another flag
    reads `FLAG VALUE gives`, so the message can say which flag to change."""
    if settings.lr_decay_iters:
        horizon = "--lr-decay-iters"
    elif settings.train_epochs:
        horizon = f"--train-iters / --train-epochs {settings.train_epochs} gives"
    else:
        horizon = "--train-iters"
    warmup = ("--lr-warmup-iters" if settings.lr_warmup_fraction is None
              else f"--lr-warmup-fraction {settings.lr_warmup_fraction} gives")
    return {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": warmup, "lr_decay_steps": horizon,
            "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay", "end_wd": "--weight-decay",
            "wd_incr_steps": horizon, "wd_incr_style": "weight-decay increment style"}


def schedule_mismatches(scheduler, saved: dict) -> list[str]:
    """What megatron's `load_state_dict` would assert on: each setting of `scheduler` that differs from the
    checkpoint's scheduler state `saved`, as `FLAG VALUE (checkpoint: VALUE)`, one entry per flag. Empty when
    they agree or when one of the two Megatron flags says which schedule wins."""
    if scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler:
        return []
    names = getattr(scheduler, "flag_names", {})  # a scheduler not built here: megatron's key names
    current = scheduler.state_dict()
    found: dict[str, str] = {}
    for key in SCHEDULE_KEYS:
        if key in saved and saved[key] != current[key]:
            name = names.get(key, key)
            found.setdefault(name, f"{name} {current[key]} (checkpoint: {saved[key]})")
    return list(found.values())


# --- model-space view of the (possibly sharded) optimizer state -------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """Where a model parameter's main (fp32) copy lives: `main` = flat range [start, end) of the model param."""

    model_param: nn.Parameter
    main: torch.Tensor
    group: dict
    start: int
    end: int


def _subs(optimizer) -> Iterator:
    """Non-stub megatron optimizers (ChainedOptimizer members, or the optimizer itself)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not getattr(sub, "is_stub_optimizer", False) and sub.optimizer is not None:
            yield sub


def _is_distributed(sub) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(sub, DistributedOptimizer)


def _sub_params_and_slots(sub) -> tuple[list[nn.Parameter], list[_Slot]]:
    """All model params this sub-optimizer covers (same on every DP rank) and this rank's local slots."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    groups = sub.optimizer.param_groups
    if _is_distributed(sub):
        covered = [p for buffer in sub.buffers for p in buffer.params]
        slots = []
        for model_param, (g, o) in sub.model_param_group_index_map.items():
            r = sub._get_model_param_range_map(model_param)["param"]
            slots.append(_Slot(model_param, groups[g]["params"][o], groups[g], r.start, r.end))
        return covered, slots
    pairs: list[tuple[nn.Parameter, torch.Tensor, dict]] = []
    if isinstance(sub, Float16OptimizerWithFloat16Params):
        for g, group in enumerate(groups):
            pairs += [(m, main, group) for m, main in zip(sub.float16_groups[g], sub.fp32_from_float16_groups[g])]
            pairs += [(p, p, group) for p in sub.fp32_from_fp32_groups[g]]
    else:  # FP32Optimizer: the model params are the main params
        pairs = [(p, p, group) for group in groups for p in group["params"]]
    slots = [_Slot(m, main, group, 0, m.numel()) for m, main, group in pairs]
    return [s.model_param for s in slots], slots


def _reduce_group(sub):
    """(DP group, device) for summing disjoint shards, or None when every rank already holds everything."""
    if not _is_distributed(sub) or not dist.is_initialized():
        return None
    if sub.data_parallel_group_gloo is not None:
        return sub.data_parallel_group_gloo, torch.device("cpu")
    return sub.data_parallel_group, platform.device()


def _local_value(sub, slot: _Slot, key: str) -> Optional[torch.Tensor]:
    state = sub.optimizer.state.get(slot.main, {})
    if key == "param":
        return slot.main
    if key == EMA_KEY:
        return state.get(EMA_KEY, slot.main)  # never stepped: the EMA is the weight itself
    return state.get(key)


def _flat_offsets(covered: Sequence[nn.Parameter]) -> tuple[dict[nn.Parameter, int], int]:
    """Where each covered param starts in one flat buffer laid out in model order, and the buffer size."""
    offsets, total = {}, 0
    for p in covered:
        offsets[p] = total
        total += p.numel()
    return offsets, total


def _gather_steps(sub, covered: Sequence[nn.Parameter], slots: Sequence[_Slot], reduce) -> torch.Tensor:
    """Per covered param, its optimizer step count (0: no state yet), the max over the DP shards."""
    device = reduce[1] if reduce else torch.device("cpu")
    steps = torch.zeros(len(covered), dtype=torch.float64, device=device)
    index = {p: i for i, p in enumerate(covered)}
    for slot in slots:
        state = sub.optimizer.state.get(slot.main, {})
        if "step" in state:
            steps[index[slot.model_param]] = float(state["step"])
    if reduce:
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=reduce[0])
    return steps


def _gather_flat(sub, slots: Sequence[_Slot], key: str, offsets: dict, total: int, reduce) -> torch.Tensor:
    """One state key of all covered params as a flat fp32 CPU tensor, assembled from this rank's slots."""
    device = reduce[1] if reduce else torch.device("cpu")
    flat = torch.zeros(total, dtype=torch.float32, device=device)
    for slot in slots:
        value = _local_value(sub, slot, key)
        if value is not None:
            base = offsets[slot.model_param]
            flat[base + slot.start: base + slot.end] = value.detach().reshape(-1).to(device, torch.float32)
    if reduce:
        dist.all_reduce(flat, group=reduce[0])  # disjoint ranges: the sum is a concatenation
    return flat.cpu()


def _entry(p: nn.Parameter, step: float, flats: dict[str, torch.Tensor], offset: int, keys: Sequence[str]) -> dict:
    """The model-space entry of one param; moments only once it has optimizer state."""
    entry: dict = {}
    for key in keys:
        if key == "step":
            entry[key] = step
        elif key in ("param", EMA_KEY) or step > 0:
            entry[key] = flats[key][offset: offset + p.numel()].view(p.shape).clone()
    return entry


def gathers_locally(optimizer) -> bool:
    """True when `gather_model_space` needs no other rank (no sub-optimizer shards its state over DP ranks), so it
    may run in a process forked from this one (the async checkpoint writer)."""
    return not any(_reduce_group(sub) for sub in _subs(optimizer))


def gather_model_space(model: nn.Module, optimizer, keys: Iterable[str] = STATE_KEYS) -> dict[str, dict]:
    """`{param_name: {key: full fp32 CPU tensor (model shape) | float step}}` for every trainable param.

    Collective over each sub-optimizer's DP group (call on all ranks). `step` is 0.0 and the moment tensors are
    absent for params that have no optimizer state yet.
    """
    keys = tuple(keys)
    names = {p: n for n, p in unwrap(model).named_parameters()}
    order = {p: i for i, p in enumerate(names)}  # model order: identical on every DP rank
    out: dict[str, dict] = {}
    for sub in _subs(optimizer):
        covered, slots = _sub_params_and_slots(sub)
        covered = sorted(set(covered), key=order.__getitem__)
        offsets, total = _flat_offsets(covered)
        reduce = _reduce_group(sub)
        steps = _gather_steps(sub, covered, slots, reduce)
        flats = {key: _gather_flat(sub, slots, key, offsets, total, reduce) for key in keys if key != "step"}
        for i, p in enumerate(covered):
            out[names[p]] = _entry(p, float(steps[i]), flats, offsets[p], keys)
    return out


def scatter_model_space(model: nn.Module, optimizer, entries: dict[str, dict]) -> None:
    """Inverse of `gather_model_space`: each rank takes its shard of every given key.

    `param` (optional) overwrites the main params; `step > 0` (re)creates the state with a per-param `step`
    tensor (the shared-step bug of megatron's loader cannot occur); `step == 0` clears it. Model weights are
    not touched: load them from the model state dict.
    """
    names = {p: n for n, p in unwrap(model).named_parameters()}
    for sub in _subs(optimizer):
        _, slots = _sub_params_and_slots(sub)
        for slot in slots:
            name = names[slot.model_param]
            if name not in entries:
                raise KeyError(f"optimizer state has no entry for parameter {name!r}")
            entry = entries[name]

            def shard(t: torch.Tensor) -> torch.Tensor:
                piece = t.reshape(-1)[slot.start: slot.end].to(slot.main.device, torch.float32)
                return piece.view_as(slot.main).clone()

            with torch.no_grad():
                if "param" in entry:
                    slot.main.copy_(shard(entry["param"]))
            step = float(entry.get("step", 0.0))
            if step <= 0:
                sub.optimizer.state.pop(slot.main, None)
                continue
            state = {"step": FusedEmaAdamW.new_step_tensor(slot.group, slot.main, step)}
            for key in ("exp_avg", "exp_avg_sq", EMA_KEY):
                if key in entry:
                    state[key] = shard(entry[key])
            sub.optimizer.state[slot.main] = state


def ema_state_dict(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """EMA weights in model-parameter space, fp32, keyed like `model.named_parameters()` (trainable only).

    Accepts a plain torch optimizer over the model's params or a megatron optimizer (gathered from DP shards
    under the distributed optimizer; collective, call on every rank). Params never stepped give their weights.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return {name: optimizer.state.get(p, {}).get(EMA_KEY, p).detach().float().clone()
                for name, p in model.named_parameters() if p.requires_grad}
    return {name: entry[EMA_KEY] for name, entry in gather_model_space(model, optimizer, keys=(EMA_KEY,)).items()}


def optimizer_state_for_save(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(EMA weights by param name, `{"param_groups", "state"}` in model space) for a checkpoint; collective.

    The fp32 main copy of an fp32 param equals the model weight, so only bf16 params keep their `param` entry.
    """
    entries = gather_model_space(model, optimizer)
    ema = {name: entry.pop(EMA_KEY) for name, entry in entries.items()}
    params = dict(unwrap(model).named_parameters())
    for name, entry in entries.items():
        if params[name].dtype == torch.float32:
            entry.pop("param")
    return ema, {"param_groups": optimizer_param_groups(optimizer), "state": entries}


def load_optimizer_state(model: nn.Module, optimizer, saved: dict, ema: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_state_for_save` at any DP size. KeyError/ValueError/RuntimeError: does not fit."""
    entries = {name: dict(entry) for name, entry in saved["state"].items()}
    for name, value in ema.items():
        if name in entries:
            entries[name][EMA_KEY] = value
    scatter_model_space(model, optimizer, entries)
    load_optimizer_param_groups(optimizer, saved["param_groups"])


def reset_optimizer_state(optimizer) -> None:
    """A fresh optimizer over the current model weights: no moments, no EMA history, main params reloaded."""
    for sub in _subs(optimizer):
        sub.optimizer.state.clear()
    optimizer.reload_model_params()


def optimizer_param_groups(optimizer) -> list[dict]:
    """Per-group hyper-parameters in a stable order (no tensors), for the checkpoint."""
    return [{k: v for k, v in g.items() if k in _GROUP_KEYS} for sub in _subs(optimizer)
            for g in sub.optimizer.param_groups]


def load_optimizer_param_groups(optimizer, saved: list[dict]) -> None:
    groups = [g for sub in _subs(optimizer) for g in sub.optimizer.param_groups]
    if len(groups) != len(saved):
        raise ValueError(f"checkpoint has {len(saved)} optimizer param groups, this model/optimizer has {len(groups)}")
    for group, values in zip(groups, saved):
        group.update(values)


_GROUP_KEYS = ("lr", "weight_decay", "betas", "eps", "ema_decay", "wd_mult", "lr_mult", "max_lr", "min_lr")
