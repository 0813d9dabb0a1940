"""Distillation's objective (training/distill.py) on a tiny predictor: the training point is the teacher's own
guided trajectory from the noise and the target an explicit M-step guided Euler integration of the base (adapters
off), both written out here; the loss and adapter gradients at TP=2 + SP equal TP=1."""

import dataclasses

import torch

from mindspeed_mm_osp.config.lora import DISTILL_TARGET_MODULES, LoRAConfig
from mindspeed_mm_osp.diffusion.student import StudentSchedule
from mindspeed_mm_osp.models.lora import apply_lora, load_lora_state_dict, lora_state_dict
from mindspeed_mm_osp.models.predictor import (
    SparseUMMDiT,
    load_merged_state_dict,
    local_state_dict,
    merge_state_dicts,
    shard_state_dict,
)
from mindspeed_mm_osp.testing import TINY_PREDICTOR, perturb_parameters, run_distributed, tiny_predictor_config
from mindspeed_mm_osp.training.distill import distill_loss, teacher_target, training_point
from mindspeed_mm_osp.training.step import EncodedBatch, keyed_generator

CFG = tiny_predictor_config(dict(TINY_PREDICTOR, num_layers=[1, 2, 1], final_block_text_params=True))
LORA = LoRAConfig(r=4, alpha=8.0, target_modules=DISTILL_TARGET_MODULES)  # every linear, as --distill adapts
SCHEDULE = StudentSchedule(student_steps=3, teacher_substeps=3, shift=3.0, guidance_scale=4.0, guidance_rescale=0.7)
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch() -> tuple[EncodedBatch, dict]:
    """Two samples (the second with padded latents and text), and the unconditional text (batch 1)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 3, 4, 6)
    mask[1, -1] = 0
    text_mask = torch.ones(2, 7, dtype=torch.long)
    text_mask[1, -2:] = 0
    enc = EncodedBatch(latents=torch.randn(2, 4, 3, 4, 6, generator=g), latent_mask=mask,
                       text=torch.randn(2, 7, 24, generator=g), text_mask=text_mask, pooled=torch.randn(2, 16, generator=g))
    negative = {"encoder_hidden_states": torch.randn(1, 7, 24, generator=g),
                "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0, 0]]),
                "pooled_projections": torch.randn(1, 16, generator=g)}
    return enc, negative


def _student(model: SparseUMMDiT, adapters: dict) -> SparseUMMDiT:
    apply_lora(model, LORA)
    load_lora_state_dict(model, adapters, "test")
    return model


def _reference():
    torch.manual_seed(0)
    model = SparseUMMDiT(CFG).train()
    perturb_parameters(model, torch.Generator().manual_seed(1))
    base = local_state_dict(model)
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(2)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model).items()}
    return base, adapters


def _explicit_guided_euler(base_model, enc: EncodedBatch, negative: dict, x: torch.Tensor, sigmas) -> torch.Tensor:
    """The teacher's sub-steps written out: separate cond and uncond passes, guidance, rescale, Euler."""
    b = x.shape[0]
    uncond = dataclasses.replace(enc, text=negative["encoder_hidden_states"].expand(b, -1, -1),
                                 text_mask=negative["encoder_attention_mask"].expand(b, -1),
                                 pooled=negative["pooled_projections"].expand(b, -1))
    g, phi = SCHEDULE.guidance_scale, SCHEDULE.guidance_rescale
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        t = torch.full((b,), s * 1000.0)
        v_c, v_u = (base_model(x, t, e.text, e.latent_mask, e.text_mask, e.pooled) for e in (enc, uncond))
        v = v_u + g * (v_c - v_u)
        ratio = v_c.std(dim=[1, 2, 3, 4], keepdim=True) / v.std(dim=[1, 2, 3, 4], keepdim=True)
        x = x + (s_next - s) * (phi * v * ratio + (1 - phi) * v)
    return x


def test_teacher_target_is_an_explicit_guided_euler_integration_of_the_base():
    base, adapters = _reference()
    enc, negative = _batch()
    base_model, model = SparseUMMDiT(CFG).eval(), SparseUMMDiT(CFG).eval()
    load_merged_state_dict(base_model, base)
    load_merged_state_dict(model, base)
    student = _student(model, adapters)
    x = torch.randn(enc.latents.shape, generator=torch.Generator().manual_seed(4))
    sigmas = SCHEDULE.sigmas()
    for step in range(SCHEDULE.student_steps):
        segment = SCHEDULE.teacher_segment(step)
        assert segment[0] == sigmas[step] and segment[-1] == sigmas[step + 1] and len(segment) == 4
        got = teacher_target(student, enc, negative, x, step, SCHEDULE, torch.float32)
        with torch.no_grad():
            want = (_explicit_guided_euler(base_model, enc, negative, x, segment) - x) / (segment[-1] - segment[0])
        torch.testing.assert_close(got, want, **TOL)
    for key in range(4):  # the training point: noise, then i x M guided fine steps of the teacher
        step, got = training_point(student, enc, negative, SCHEDULE, keyed_generator(key), torch.float32)
        g = keyed_generator(key)
        assert step == int(torch.multinomial(SCHEDULE.step_probabilities(), 1, generator=g))
        noise = torch.randn(enc.latents.shape, generator=g)
        path = torch.cat([SCHEDULE.teacher_segment(i)[:-1] for i in range(step)] + [sigmas[step:step + 1]])
        with torch.no_grad():
            torch.testing.assert_close(got, _explicit_guided_euler(base_model, enc, negative, noise, path), **TOL)
    # the adapters are back on after the teacher pass: the student's own velocity differs from the base's
    with torch.no_grad():
        t = torch.full((2,), 500.0)
        args = (x, t, enc.text, enc.latent_mask, enc.text_mask, enc.pooled)
        assert not torch.allclose(student(*args), base_model(*args), **TOL)


def _distill_rank(rank, world_size, base, adapters, sequence_parallel):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = SparseUMMDiT(CFG, sequence_parallel=sequence_parallel).train()
    load_merged_state_dict(model, base)
    _student(model, shard_state_dict(adapters, rank, world_size))
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True))
    enc, negative = _batch()
    ddp.zero_grad_buffer()
    loss = distill_loss(ddp, SCHEDULE, enc, negative, keyed_generator(1234, "noise", 0, 0), torch.float32)
    loss.backward()
    finalize_model_grads([ddp])
    return loss.item(), {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_distillation_loss_and_adapter_grads_at_tp2_sp_equal_tp1():
    base, adapters = _reference()
    (ref_loss, ref_grads), = run_distributed(_distill_rank, 1, base, adapters, False)
    ranks = run_distributed(_distill_rank, 2, base, adapters, True, tp=2)
    for loss, _ in ranks:
        assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    grads = merge_state_dicts([g for _, g in ranks])
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")
