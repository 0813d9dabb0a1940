"""Few-step distillation by trajectory matching (docs/distillation.md): `pretrain.py --distill trajectory --lora-r R`.

The teacher is the frozen base with classifier-free guidance folded in; the student is the same base plus LoRA
adapters, so one copy of the weights serves both (`models.lora.adapters_disabled` turns the adapters off for the
teacher pass). Per micro-batch, from the micro-batch's keyed generator (so TP/CP peers agree, DP ranks differ and
a resumed run draws what the uninterrupted one would): a student step i of the K-step grid (with probability
sigma_i - sigma_i+1: the long low-noise steps decide the sample) and the noise e; x_i
is the teacher's own guided trajectory from e to sigma_i (i x M fine steps; x_0 = e). The teacher integrates x_i
to sigma_{i+1} with M guided Euler sub-steps (cond and uncond rows in one forward, without autograd); the
student, conditioned on the prompt only, must make that move in one Euler step: its velocity target is
(x_{i+1} - x_i) / (sigma_{i+1} - sigma_i), loss masked MSE.

Everything else is the `Trainer`'s: TP/SP/CP/DP, the adapters' EMA, checkpoints (which record the student
schedule in their LoRA metadata), exact resume and the skipping of non-finite steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ConfigError, DataConfig
from ..config.diffusion import DiffusionConfig
from ..diffusion import FlowMatchingScheduler, sample
from ..diffusion.student import StudentSchedule
from ..models.lora import adapters_disabled
from ..models.text.preprocess import PROMPT_VERSION
from .step import EncodedBatch, LossRegion, model_inputs
from .trainer import Trainer

TextKw = dict[str, torch.Tensor]
# Every segment counts the same: unweighted masked MSE, whatever weighting the base was pre-trained with.
_MSE = FlowMatchingScheduler(DiffusionConfig(weighting_scheme="none"))


def negative_text(encoders, data_cfg: DataConfig, file: str) -> TextKw:
    """The teacher's unconditional text: the v1.5 negative prompt `inference.py` uses by default, tokenised as the
    training captions are and encoded once (predictor keywords, batch 1)."""
    from ..data.dataset import CaptionProcessor
    from ..models.text import load_tokenizer, sampler_texts

    if encoders.text is None:
        raise ConfigError(file, "load_text_features", "--distill encodes the teacher's negative prompt with the text "
                          "encoders: set load_text_features to false in the model JSON")
    dp = data_cfg.dataset_param
    second = load_tokenizer(dp.tokenizer_config_2) if dp.tokenizer_config_2 is not None else None
    tokens = CaptionProcessor(load_tokenizer(dp.tokenizer_config), second, max_length=dp.model_max_length, cfg=0.0,
                              clean=False)(sampler_texts("", None, PROMPT_VERSION)[1])
    with torch.no_grad():
        hidden, mask, pooled = encoders.text.encode(tokens["input_ids"], tokens["attention_mask"],
                                                    tokens.get("input_ids_2"), tokens.get("attention_mask_2"))
    return _text_kw(hidden, mask, pooled)


def _text_kw(hidden: torch.Tensor, mask: torch.Tensor, pooled: Optional[torch.Tensor]) -> TextKw:
    kw = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
    return kw if pooled is None else {**kw, "pooled_projections": pooled}


def _guided_model_fn(predictor: nn.Module, enc: EncodedBatch, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """`diffusion.sample`'s model for the teacher: the text of the call's rows ([uncond; cond] when guided) with the
    micro-batch's latent mask and image-to-video condition repeated to match."""
    b = enc.latents.shape[0]

    def model_fn(x: torch.Tensor, timestep: torch.Tensor, **text) -> torch.Tensor:
        reps = x.shape[0] // b

        def repeat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.repeat(reps, *([1] * (t.ndim - 1)))

        rows = dataclasses.replace(
            enc, latent_mask=repeat(enc.latent_mask), text=text["encoder_hidden_states"],
            text_mask=text["encoder_attention_mask"], pooled=text.get("pooled_projections"),
            condition_latents=repeat(enc.condition_latents), condition_mask=repeat(enc.condition_mask))
        return predictor(**model_inputs(rows, x, timestep, dtype)).float()

    return model_fn


@torch.no_grad()
def teacher_integrate(predictor: nn.Module, enc: EncodedBatch, negative: TextKw, x: torch.Tensor,
                      sigmas: torch.Tensor, schedule: StudentSchedule, dtype: torch.dtype) -> torch.Tensor:
    """`x` (fp32) after the guided teacher's Euler steps over `sigmas`; the predictor's adapters are off."""
    b = x.shape[0]
    cond = _text_kw(enc.text, enc.text_mask, enc.pooled)
    uncond = {k: v.to(cond[k].device).expand(b, *v.shape[1:]) for k, v in negative.items()}
    with adapters_disabled(predictor):
        return sample(_guided_model_fn(predictor, enc, dtype), x.float(), cond, uncond, sigmas=sigmas,
                      guidance_scale=schedule.guidance_scale, guidance_rescale=schedule.guidance_rescale)


def teacher_target(predictor: nn.Module, enc: EncodedBatch, negative: TextKw, x: torch.Tensor, step: int,
                   schedule: StudentSchedule, dtype: torch.dtype) -> torch.Tensor:
    """The velocity (fp32) that takes `x` (at the student's sigma_step) in one Euler step to where the guided
    teacher gets in `schedule.teacher_substeps` steps."""
    segment = schedule.teacher_segment(step)
    x_next = teacher_integrate(predictor, enc, negative, x, segment, schedule, dtype)
    return (x_next - x.float()) / (segment[-1] - segment[0]).item()


def training_point(predictor: nn.Module, enc: EncodedBatch, negative: TextKw, schedule: StudentSchedule,
                   generator: torch.Generator, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(student step i, x_i): i (drawn with `schedule.step_probabilities`) and the noise e from the micro-batch's
    keyed generator, in this order; x_i is the teacher's own guided trajectory from e (sigma = 1) to sigma_i, on
    its fine grid, i x M steps."""
    step = int(torch.multinomial(schedule.step_probabilities(), 1, generator=generator))
    noise = torch.randn(enc.latents.shape, generator=generator, dtype=torch.float32).to(enc.latents.device)
    if step == 0:
        return step, noise
    path = schedule.sigmas(schedule.student_steps * schedule.teacher_substeps)[:step * schedule.teacher_substeps + 1]
    path[-1] = schedule.sigmas()[step]
    return step, teacher_integrate(predictor, enc, negative, noise, path, schedule, dtype)


def distill_loss(predictor: nn.Module, schedule: StudentSchedule, enc: EncodedBatch, negative: TextKw,
                 generator: torch.Generator, dtype: torch.dtype, loss_region: LossRegion = "all") -> torch.Tensor:
    """Masked MSE (fp32 scalar) between the student's velocity at x_i and the teacher's one-step target."""
    step, x = training_point(predictor, enc, negative, schedule, generator, dtype)
    target = teacher_target(predictor, enc, negative, x, step, schedule, dtype)
    sigma = schedule.sigmas()[step].expand(x.shape[0])
    pred = predictor(**model_inputs(enc, x, FlowMatchingScheduler.timesteps(sigma), dtype))
    return _MSE.loss(pred, target, mask=enc.loss_mask(loss_region))


class DistillTrainer(Trainer):
    """The `Trainer` with the distillation objective; checkpoints record the student schedule."""

    def __init__(self, args):
        super().__init__(args)
        self.schedule = args.student_schedule()

    def build(self) -> None:
        super().build()
        self.negative = negative_text(self.encoders, self.data_cfg, self.args.mm_model)

    def data_config(self) -> DataConfig:
        """Every text as the sampler encodes it, since the student is asked for the guided field of the texts it
        will be given: each caption through the prompt template, never dropped (the teacher's unconditional text
        is its negative prompt), and captions and negative prompt cut at the sampler's T5 length
        (`--distill-text-length`; padding is masked, so only the cut matters: the v1.5 negative prompt alone is 275
        tokens of the tiny tokenizer, more than a pre-training `model_max_length` may keep)."""
        cfg = super().data_config()
        dp = cfg.dataset_param
        preprocess = dataclasses.replace(dp.preprocess_parameters, cfg=0.0)
        return dataclasses.replace(cfg, dataset_param=dataclasses.replace(
            dp, caption_template=PROMPT_VERSION, preprocess_parameters=preprocess,
            model_max_length=self.args.distill_text_length))

    def build_model(self) -> nn.Module:
        model = super().build_model()
        self.lora = {**self.lora, "distill": self.schedule.to_record()}
        return model

    def micro_batch_loss(self, enc: EncodedBatch, generator: torch.Generator) -> torch.Tensor:
        return distill_loss(self.ddp, self.schedule, enc, self.negative, generator, self.precision.predictor,
                            self.args.i2v_loss_region)


__all__ = ["DistillTrainer", "distill_loss", "negative_text", "teacher_integrate", "teacher_target", "training_point"]
