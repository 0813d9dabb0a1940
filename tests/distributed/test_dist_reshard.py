"""torch_dist checkpoints of the tiny predictor with its real megatron optimizer (distributed, EMA, cosine
schedule, adaptive clip), saved at TP=2:

* read back at TP=1 x DP=2, the run holds exactly the saved model-space state (weights, EMA, Adam moments, fp32
  masters, per-parameter step), schedule and clip state, bit for bit, and goes on training; its generators are
  reseeded from the saved seed plus the iteration, while a load at the saving layout gives each rank its own
  RNG states back;
* the converter's legacy -> torch_dist -> legacy round trip is bit-exact, and merging either format (with or
  without `--ema`) gives the same weights, as do the runtime loaders (inference, LoRA base and adapters);
* LoRA adapters and their optimizer state resume across the TP change, and the adapter checkpoint stays small.
"""

import pytest
import torch

from mindspeed_mm_osp.checkpoint import convert
from mindspeed_mm_osp.checkpoint.layout import iteration_dir, model_file
from mindspeed_mm_osp.config.lora import LoRAConfig
from mindspeed_mm_osp.testing import run_distributed, tiny_predictor_config, tiny_predictor_weights
from test_lora_checkpoint import inputs

pytestmark = pytest.mark.slow  # about 30 s: two TP=2 trainings with saves, five loads, four conversions

LORA = LoRAConfig(r=4, alpha=8.0)


def _build(lora: bool, base: dict):
    """The tiny predictor at this rank's TP with the merged weights `base` (LoRA: adapters on it), megatron DDP,
    optimizer, schedule and clip."""
    from mindspeed_mm_osp.models.lora import apply_lora, lora_metadata
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict
    from mindspeed_mm_osp.optim import AdaptiveGradClip, OptimizerSettings, build_lr_scheduler, build_optimizer
    from mindspeed_mm_osp.parallel import ParallelDims
    from mindspeed_mm_osp.training.components import wrap_ddp

    dims = ParallelDims.current()
    cfg = tiny_predictor_config()
    model = SparseUMMDiT(cfg, sequence_parallel=dims.tp > 1).train()
    load_merged_state_dict(model, base)
    meta = None
    if lora:
        apply_lora(model, LORA)
        meta = lora_metadata(LORA, cfg)
    ddp = wrap_ddp(model, type("Args", (), dict(overlap_grad_reduce=False, use_distributed_optimizer=True)))
    settings = OptimizerSettings(lr=1e-3, ema_decay=0.9, lr_warmup_iters=1, train_iters=10, lr_decay_style="cosine",
                                 clip_grad=1.0, clip_grad_ema_decay=0.9, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp, settings)
    return ddp, optimizer, build_lr_scheduler(optimizer, settings), AdaptiveGradClip(1.0, 0.9), meta


def _train(run, steps: int) -> None:
    from megatron.core.distributed import finalize_model_grads

    from mindspeed_mm_osp.optim import clip_and_step

    ddp, optimizer, scheduler, clip, _ = run
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(*inputs()).float().pow(2).mean().backward()
        finalize_model_grads([ddp])
        if clip_and_step(optimizer, clip).update_successful:
            scheduler.step(1)


def _state(run) -> dict:
    """This rank's model-space optimizer state (its TP slice), weights, schedule and clip state."""
    from mindspeed_mm_osp.models.lora import lora_state_dict
    from mindspeed_mm_osp.optim import gather_model_space

    ddp, optimizer, scheduler, clip, meta = run
    weights = lora_state_dict(ddp.module) if meta else {k: v.detach().clone() for k, v in ddp.module.state_dict().items()
                                                      if torch.is_tensor(v)}
    return {"space": gather_model_space(ddp.module, optimizer), "weights": weights,
            "scheduler": scheduler.state_dict(), "clip": clip.state_dict()}


def _save_tp2(rank, world_size, root, lora, base):
    from mindspeed_mm_osp.checkpoint import load_checkpoint, save_checkpoint

    run = _build(lora, base)
    _train(run, 3)
    ddp, optimizer, scheduler, clip, meta = run
    rng = torch.get_rng_state()
    for fmt in ("legacy", "torch_dist"):
        save_checkpoint(root / fmt, 3, ddp, optimizer, scheduler, clip=clip, consumed_train_samples=6,
                        args={"seed": 5}, lora=meta, ckpt_format=fmt)
    state = _state(run)
    torch.rand(3)
    load_checkpoint(root / "torch_dist", ddp, optimizer, scheduler, clip=clip, lora=meta)
    assert torch.equal(torch.get_rng_state(), rng)  # the saving layout: each rank's own RNG states come back
    return state


def _load_tp1(rank, world_size, root, lora, base):
    from mindspeed_mm_osp.checkpoint import load_checkpoint

    run = _build(lora, base)
    ddp, optimizer, scheduler, clip, meta = run
    loaded = load_checkpoint(root / "torch_dist", ddp, optimizer, scheduler, clip=clip, lora=meta)
    # another layout: the generators are reseeded from the saved seed (5) plus the iteration (3)
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(8).get_state())
    state = _state(run)
    _train(run, 1)
    return loaded.iteration, loaded.consumed_train_samples, state


def _merged(ranks: list[dict]) -> dict:
    """The TP ranks' states as one TP=1 view."""
    from mindspeed_mm_osp.models.predictor import merge_state_dicts

    space = {}
    for name in ranks[0]["space"]:
        entries = [r["space"][name] for r in ranks]
        space[name] = {k: entries[0][k] if k == "step" else merge_state_dicts([{name: e[k]} for e in entries])[name]
                       for k in entries[0]}
    return {"space": space, "weights": merge_state_dicts([r["weights"] for r in ranks]),
            "scheduler": ranks[0]["scheduler"], "clip": ranks[0]["clip"]}


def _assert_equal(a, b, where=""):
    """Nested dicts/lists of tensors and plain values, bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    return root, request.param, _merged(run_distributed(_save_tp2, 2, root, request.param, tiny_predictor_weights(0),
                                                        tp=2))


def test_tp2_save_resumes_at_tp1_dp2_bit_exact(saved):
    root, lora, expected = saved
    # LoRA resumes on the same base; a full model starts from other weights, which only the load can make equal
    base = tiny_predictor_weights(0 if lora else 1)
    for iteration, consumed, state in run_distributed(_load_tp1, 2, root, lora, base, tp=1):
        assert (iteration, consumed) == (3, 6)
        _assert_equal(state, expected)
    assert all(e["step"] == 3.0 for e in expected["space"].values())
    if lora:  # an adapter checkpoint holds adapters and their optimizer state only
        from mindspeed_mm_osp.checkpoint.dist_format import tensor_name
        from mindspeed_mm_osp.checkpoint.dist_safe import read_dcp_metadata
        from mindspeed_mm_osp.models.predictor.tp_layout import ADAPTER_KEY

        stored = read_dcp_metadata(iteration_dir(root / "torch_dist", 3)).state_dict_metadata
        assert {tensor_name(k) for k in stored} == set(expected["weights"])
        assert all(ADAPTER_KEY.match(tensor_name(k)) for k in stored)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_converter_round_trip_is_bit_exact_and_merges_agree(saved, tmp_path):
    root, lora, _ = saved
    convert.main(["--load_dir", str(root / "legacy"), "--save_dir", str(tmp_path / "dist"),
                  "--ckpt-format", "torch_dist"])
    convert.main(["--load_dir", str(tmp_path / "dist" / "iter_0000003"), "--save_dir", str(tmp_path / "back"),
                  "--ckpt-format", "legacy"])
    for rank in range(2):
        _assert_equal(_load(model_file(tmp_path / "back", 3, rank)), _load(model_file(root / "legacy", 3, rank)))
    for ema in (False, True):
        reference = convert.merge_checkpoint(root / "legacy", ema=ema).state_dict
        for source in (root / "torch_dist", tmp_path / "dist"):
            _assert_equal(convert.merge_checkpoint(source, ema=ema).state_dict, reference, str(source))
    if not lora:
        convert.main(["--load_dir", str(root / "torch_dist"), "--save_dir", str(tmp_path / "merged"), "--ema",
                      "--format", "pt"])
        _assert_equal(_load(tmp_path / "merged" / "model_ema.pt"), convert.merge_checkpoint(root / "legacy", ema=True)
                      .state_dict)
    assert (iteration_dir(tmp_path / "dist", 3) / "manifest.json").is_file()
    # runtime weights (inference, a LoRA base, --lora adapters) from a folder of either format
    from mindspeed_mm_osp.checkpoint.weights import load_lora_adapters, load_predictor_weights

    read = load_lora_adapters if lora else load_predictor_weights
    _assert_equal(read(root / "torch_dist"), read(root / "legacy"))
