"""Distillation without training: the student's grid is the sampler's, the teacher's sub-grid contains it, flags
and the release launcher parse, and the planner counts adapters, the frozen base and the teacher's forwards."""

import dataclasses
import json

import pytest
import torch

from mindspeed_mm_osp.config.diffusion import DiffusionConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler
from mindspeed_mm_osp.diffusion.student import StudentSchedule
from mindspeed_mm_osp.training.arguments import parse_args
from helpers import launcher_argv

SCHEDULE = StudentSchedule(student_steps=4, teacher_substeps=12, shift=7.0, guidance_scale=8.0, guidance_rescale=0.7)


@pytest.mark.parametrize("steps", [4, 8, 50])
def test_student_grid_is_the_samplers_grid(steps):
    sampler = FlowMatchingScheduler(DiffusionConfig(shift=7.0, use_dynamic_shifting=False))
    assert torch.equal(SCHEDULE.sigmas(steps), sampler.sampling_sigmas(steps))
    overrides = SCHEDULE.diffusion_overrides()
    assert overrides["num_inference_steps"] == 4 and overrides["guidance_scale"] == 1.0
    assert torch.equal(FlowMatchingScheduler(DiffusionConfig(**{k: v for k, v in overrides.items()
                                                                if k != "guidance_rescale"})).sampling_sigmas(),
                       SCHEDULE.sigmas())


def test_teacher_segments_tile_the_fine_grid_between_student_points():
    fine, student = SCHEDULE.sigmas(48), SCHEDULE.sigmas()
    joined = torch.cat([SCHEDULE.teacher_segment(i)[:-1] for i in range(4)] + [student[-1:]])
    torch.testing.assert_close(joined, fine, rtol=0, atol=1e-7)
    for i in range(4):
        segment = SCHEDULE.teacher_segment(i)
        assert len(segment) == 13 and segment[0] == student[i] and segment[-1] == student[i + 1]
        assert bool((segment[1:] < segment[:-1]).all())
    with pytest.raises(ValueError, match="outside"):
        SCHEDULE.teacher_segment(4)


def test_recorded_schedule_round_trips_and_malformed_records_are_refused():
    assert StudentSchedule.from_record(SCHEDULE.to_record(), "f") == SCHEDULE
    with pytest.raises(ValueError, match="f.safetensors: unreadable student schedule"):
        StudentSchedule.from_record({**SCHEDULE.to_record(), "shift": 0.5}, "f.safetensors")
    with pytest.raises(ValueError, match="expected the keys"):
        StudentSchedule.from_record({"student_steps": 4}, "f")


def test_training_steps_are_drawn_by_the_share_of_the_noise_range_they_cover():
    # shift 7: sigma(t) = 7 t / (1 + 6 t) at t = 1, 3/4, 1/2, 1/4, 0 -> 1, 21/22, 7/8, 7/10, 0
    want = torch.tensor([1 - 21 / 22, 21 / 22 - 7 / 8, 7 / 8 - 7 / 10, 7 / 10], dtype=torch.float64)
    torch.testing.assert_close(SCHEDULE.step_probabilities(), want, rtol=0, atol=1e-7)
    # M for the target plus i x M for the rollout, at these chances: 12 x (1 p0 + 2 p1 + 3 p2 + 4 p3)
    assert SCHEDULE.mean_teacher_steps() == pytest.approx(12 * float((want * torch.arange(1, 5)).sum()), abs=1e-5)


BASE_ARGV = ["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "2"]


def test_distillation_adapts_every_linear_unless_targets_are_given():
    from mindspeed_mm_osp.config.lora import DEFAULT_TARGET_MODULES
    from mindspeed_mm_osp.models.lora import _linear_names, resolve_targets
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT
    from mindspeed_mm_osp.testing import tiny_predictor_config

    distill = ["--lora-r", "4", "--distill", "trajectory"]
    assert parse_args(BASE_ARGV + distill).lora_config().target_modules == ("all",)
    assert parse_args(BASE_ARGV + ["--lora-r", "4"]).lora_config().target_modules == DEFAULT_TARGET_MODULES
    given = parse_args(BASE_ARGV + distill + ["--lora-target-modules", "to_q", "proj_out"])
    assert given.lora_config().target_modules == ("to_q", "proj_out")
    with torch.device("meta"):
        model = SparseUMMDiT(tiny_predictor_config())
    names = resolve_targets(model, ("all",))
    assert names == _linear_names(model) and set(resolve_targets(model, DEFAULT_TARGET_MODULES)) < set(names)
    assert {"proj_out", "caption_projection", "norm_out.linear"} <= set(names)


@pytest.mark.parametrize("extra,message", [
    (["--distill", "trajectory"], "add --lora-r R"),
    (["--distill-student-steps", "8"], "--distill-student-steps need --distill trajectory"),
    (["--lora-target-modules", "all"], "--lora-target-modules need --lora-r"),
    (["--distill", "trajectory", "--lora-r", "4", "--distill-shift", "0.5"], "--distill-shift"),
    (["--distill", "trajectory", "--lora-r", "4", "--distill-teacher-substeps", "0"], "--distill-teacher-substeps"),
])
def test_bad_distillation_flags_exit_2_with_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE_ARGV + extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_release_distillation_launcher_parses(tmp_path):
    args = parse_args(launcher_argv(tmp_path, "examples/opensoraplan1.5/distill_opensoraplan1_5.sh"), world_size=16)
    assert (args.tensor_model_parallel_size, args.sequence_parallel, args.lora_r) == (8, True, 64)
    assert args.student_schedule() == SCHEDULE
    assert args.load.endswith("model_ema.pt") and args.lora_load == str(tmp_path / "proj")
    assert args.ema_decay == 0.995  # an EMA of the adapters that a few thousand iterations move (it is merged)
    from mindspeed_mm_osp.tools.plan import trainable_plan

    plan = trainable_plan(args)  # the planner's teacher forwards: round(12 x 3.5295) for the launcher's K = 4
    assert (plan.lora_targets, plan.teacher_passes, plan.teacher_rows) == (("all",), 42, 2)


def test_planner_counts_adapters_the_frozen_base_and_the_teacher_forwards():
    from mindspeed_mm_osp.config.predictor import RecomputeConfig
    from mindspeed_mm_osp.testing import tiny_predictor_config
    from mindspeed_mm_osp.training.flops import predictor_forward_flops
    from mindspeed_mm_osp.training.memory_plan import (Parallel, TrainablePlan, Workload, adapter_param_count,
                                                       local_param_count, plan_memory)

    cfg, work, par = tiny_predictor_config(), Workload(1, 3, 8, 8, 16), Parallel()
    targets = ("to_q", "to_out.0")
    adapters = adapter_param_count(cfg, 1, 4, targets)
    # to_q: A 4 x 64, B 64 x 4; to_out.0 the same, on 3 blocks (hidden 64)
    assert adapters == 3 * 2 * (4 * 64 + 64 * 4)
    full = plan_memory(cfg, work, par, RecomputeConfig(), torch.float32)
    lora = plan_memory(cfg, work, par, RecomputeConfig(), torch.float32,
                       trainable=TrainablePlan(lora_r=4, lora_targets=targets, teacher_passes=6))
    twin = plan_memory(cfg, work, par, RecomputeConfig(), torch.float32, trainable=TrainablePlan(teacher_passes=6,
                                                                                                teacher_copy=True))
    params = local_param_count(cfg, 1)
    assert (lora.weights, lora.grads) == ((params + adapters) * 4, adapters * 4)
    assert (twin.weights, twin.grads) == (2 * params * 4, params * 4) and twin.total > lora.total
    teacher = 6 * predictor_forward_flops(cfg, 2, (3, 8, 8), 16)
    assert lora.model_flops == pytest.approx(full.model_flops + teacher)


def test_distillation_reads_each_caption_as_the_sampler_encodes_a_prompt_and_never_drops_it(tmp_path):
    """The student is asked for the guided field of the texts `inference.py` will give it ("high quality, <prompt>",
    cleaned), so its captions get the sampler's template and no CFG drop; pre-training reads the JSON as written."""
    from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict
    from mindspeed_mm_osp.training.distill import DistillTrainer
    from mindspeed_mm_osp.training.trainer import Trainer

    (tmp_path / "data.json").write_text(json.dumps(data_json_dict(tmp_path / "data.txt", cfg=0.1)))
    argv = ["--mm-data", str(tmp_path / "data.json"), *BASE_ARGV[2:], "--lora-r", "4"]
    plain = Trainer(parse_args(argv)).data_config().dataset_param
    distill = DistillTrainer(parse_args(argv + ["--distill", "trajectory"])).data_config().dataset_param
    assert (plain.caption_template, plain.preprocess_parameters.cfg) == (None, 0.1)
    assert (distill.caption_template, distill.preprocess_parameters.cfg) == ("v1.5", 0.0)
    assert (plain.model_max_length, distill.model_max_length) == (32, 512)  # inference.py's T5 length
    given = parse_args(argv + ["--distill", "trajectory", "--distill-text-length", "64"])
    assert DistillTrainer(given).data_config().dataset_param.model_max_length == 64
    assert dataclasses.replace(distill, caption_template=None, preprocess_parameters=plain.preprocess_parameters,
                               model_max_length=32) == plain
