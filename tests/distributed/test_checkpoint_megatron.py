"""Checkpoint round trips with megatron optimizers: bit-exact state (EMA, per-param step), bit-exact
continuation, DP resharding, TP layout, and failed writes on one rank."""

from __future__ import annotations

import errno

import pytest
import torch

from mindspeed_mm_osp.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from mindspeed_mm_osp.checkpoint import io as ckpt_io
from mindspeed_mm_osp.optim import AdaptiveGradClip, build_lr_scheduler, build_optimizer, gather_model_space
from mindspeed_mm_osp.testing import run_distributed
from helpers import make_model, settings, train_step


def _setup(use_dist: bool, bf16: bool, seed: int):
    torch.manual_seed(seed)
    model, _ = make_model(bf16=bf16, use_distributed_optimizer=use_dist)
    if seed != 7:  # a different starting point, so only the load can make it equal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    s = settings(use_distributed_optimizer=use_dist, bf16=bf16, lr_warmup_iters=2, lr_decay_style="cosine",
                 clip_grad=1.0, clip_grad_ema_decay=0.9)
    opt = build_optimizer(model, s)
    return model, opt, build_lr_scheduler(opt, s), AdaptiveGradClip(s.clip_grad, s.clip_grad_ema_decay)


def _run(model, opt, sched, clip, steps, rank, world_size):
    for step in steps:
        if train_step(model, opt, clip, step, rank, world_size).update_successful:
            sched.step(1)


def _inner_steps(opt):
    inner = opt.chained_optimizers[0].optimizer
    return [inner.state[p]["step"] for g in inner.param_groups for p in g["params"]]


def _round_trip(rank, world_size, use_dist, bf16, root):
    model, opt, sched, clip = _setup(use_dist, bf16, seed=7)
    _run(model, opt, sched, clip, range(3), rank, world_size)
    save_checkpoint(root, 3, model, opt, sched, clip=clip, consumed_train_samples=24, args={"run": "a"})
    saved_space = gather_model_space(model, opt)
    rng_at_save, clip_at_save = torch.get_rng_state(), clip.state_dict()
    _run(model, opt, sched, clip, range(3, 5), rank, world_size)
    uninterrupted = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    final_space = gather_model_space(model, opt)

    model2, opt2, sched2, clip2 = _setup(use_dist, bf16, seed=11)
    loaded = load_checkpoint(root, model2, opt2, sched2, clip=clip2)
    assert (loaded.iteration, loaded.consumed_train_samples) == (3, 24)
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert clip2.state_dict() == clip_at_save and clip_at_save["initialized"]
    steps = _inner_steps(opt2)
    assert len({id(s) for s in steps}) == len(steps) and all(float(s) == 3.0 for s in steps)
    assert sched2.num_steps == 3
    loaded_space = gather_model_space(model2, opt2)
    _run(model2, opt2, sched2, clip2, range(3, 5), rank, world_size)
    resumed = {n: p.detach().clone() for n, p in model2.module.named_parameters()}
    file_ema = torch.load(loaded.path, weights_only=False)["ema_model"] if rank == 0 else None
    return saved_space, loaded_space, uninterrupted, resumed, final_space, gather_model_space(model2, opt2), file_ema


def _assert_spaces_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            va, vb = a[name][key], b[name][key]
            assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), (name, key)


@pytest.mark.parametrize("world_size,use_dist,bf16", [(1, False, False), (2, True, False), (2, True, True),
                                                      (2, False, True)])
def test_round_trip_bit_exact_and_continues_identically(tmp_path, world_size, use_dist, bf16):
    results = run_distributed(_round_trip, world_size, use_dist, bf16, str(tmp_path), tp=1)
    for saved, loaded, uninterrupted, resumed, final, final_resumed, _ in results:
        _assert_spaces_equal(saved, loaded)  # param, exp_avg, exp_avg_sq, ema_params, step
        for name in uninterrupted:
            assert torch.equal(uninterrupted[name], resumed[name]), name
        _assert_spaces_equal(final, final_resumed)
    saved, file_ema = results[0][0], results[0][6]
    assert set(file_ema) == set(saved)
    for name in saved:
        assert file_ema[name].dtype == torch.float32 and torch.equal(file_ema[name], saved[name]["ema_params"])


def _save_dp2(rank, world_size, root):
    model, opt, sched, clip = _setup(True, False, seed=7)
    _run(model, opt, sched, clip, range(3), rank, world_size)
    save_checkpoint(root, 3, model, opt, sched, clip=clip)
    return gather_model_space(model, opt)


def _load_dp1(rank, world_size, root, use_dist):
    model, opt, sched, clip = _setup(use_dist, False, seed=11)
    load_checkpoint(root, model, opt, sched, clip=clip)
    space = gather_model_space(model, opt)
    _run(model, opt, sched, clip, range(3, 5), rank, world_size)  # and it keeps training
    return space


@pytest.mark.parametrize("use_dist", [True, False])
def test_resume_at_dp1_from_dp2_save(tmp_path, use_dist):
    saved = run_distributed(_save_dp2, 2, str(tmp_path), tp=1)[0]
    _assert_spaces_equal(saved, run_distributed(_load_dp1, 1, str(tmp_path), use_dist, tp=1)[0])


def _finetune_and_no_load_optim(rank, world_size, root):
    model, opt, sched, clip = _setup(True, False, seed=7)
    _run(model, opt, sched, clip, range(3), rank, world_size)
    save_checkpoint(root, 3, model, opt, sched, clip=clip)
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    out = {}
    for mode in ("finetune", "no_load_optim"):
        model2, opt2, sched2, clip2 = _setup(True, False, seed=11)
        loaded = load_checkpoint(root, model2, opt2, sched2, clip=clip2, **{mode: True})
        out[mode] = loaded.iteration
        assert all(torch.equal(weights[n], p) for n, p in model2.module.named_parameters())
        assert not opt2.chained_optimizers[0].optimizer.state and sched2.num_steps == 0 and not clip2.initialized
        _run(model2, opt2, sched2, clip2, range(1), rank, world_size)  # EMA starts again from the loaded weights
    return out


def test_finetune_and_no_load_optim(tmp_path):
    for out in run_distributed(_finetune_and_no_load_optim, 2, str(tmp_path), tp=1):
        assert out == {"finetune": 0, "no_load_optim": 3}


def _tp2_save_fails_on_one_rank(rank, world_size, root):
    model, opt, sched, clip = _setup(False, False, seed=7)
    _run(model, opt, sched, clip, range(2), rank, world_size)
    save_checkpoint(root, 2, model, opt, sched, clip=clip)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    _run(model, opt, sched, clip, range(2, 3), rank, world_size)
    if rank == 1:
        def failing(obj, f):
            f.write(b"partial")
            raise OSError(errno.EIO, "Input/output error")

        ckpt_io._write_payload = failing
    try:
        save_checkpoint(root, 3, model, opt, sched, clip=clip)
        raised = None
    except CheckpointWriteError as exc:
        raised = str(exc)
    model2, opt2, sched2, clip2 = _setup(False, False, seed=11)
    loaded = load_checkpoint(root, model2, opt2, sched2, clip=clip2)
    same = all(torch.equal(before[n], p) for n, p in model2.module.named_parameters())
    return raised, loaded.iteration, same


def _load_at_tp1(rank, world_size, root):
    model, opt, sched, clip = _setup(False, False, seed=7)
    with pytest.raises(CheckpointError, match="saved with tensor-parallel size 2, this run uses 1"):
        load_checkpoint(root, model, opt, sched, clip=clip)
    return True


def test_tp2_layout_failed_write_on_one_rank_and_tp_mismatch(tmp_path):
    results = run_distributed(_tp2_save_fails_on_one_rank, 2, str(tmp_path), tp=2)
    assert "Input/output error" in results[1][0] and "another rank failed" in results[0][0]
    assert all(r[1:] == (2, True) for r in results)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    names = sorted(p.name for p in (tmp_path / "iter_0000002").iterdir())
    assert names == ["manifest.json", "mp_rank_00", "mp_rank_01"]
    assert not (tmp_path / "iter_0000003").exists()
    assert run_distributed(_load_at_tp1, 1, str(tmp_path), tp=1) == [True]
