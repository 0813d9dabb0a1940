"""One inference request (prompts + settings) through named stages, the way `training.trainer.Trainer` runs training.

`InferenceRunner.run`: `setup` (the config from the flags, process groups) -> `build` (text encoders, predictor
with LoRA and compile, VAE, the image-to-video condition's frames, the clip to edit) -> for each micro-batch of this
replica's prompts `encode_prompt` -> `prepare_condition` -> `denoise` -> per sample `decode` -> `write`.
`--save-latents` writes after `denoise`, `--decode-latents` runs `decode` -> `write` on saved latents,
`--benchmark` times the stages and writes a report instead. The runner alone reads the config and the flags and
hands every stage's building block (`pipeline`, `conditioning`, `editing`, the models) plain values; what a
micro-batch carries between stages is one `Batch`, what lasts for the run one `RunState`. docs/inference.md
follows a request through these stages.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import platform
from ..config import ConfigError, InferenceConfig, to_dict
from ..diffusion.step_cache import StepCache
from .arguments import InferenceArgs, build_config
from .benchmark import StageTimer, peak_memory
from .cfg_parallel import describe_pairs
from .conditioning import InpaintCondition, condition_pixels, condition_report
from .editing import EditSource, edit_pixels
from .pipeline import TextConditioner, denoise, initial_noise, load_latents, load_prompts, save_latents
from .ranks import Ranks, init_parallel, release_parallel
from .weights import recorded_student

logger = logging.getLogger("mindspeed_mm_osp.inference")


def prepare_texts(prompts: Sequence[str], negative_prompt: Optional[str], version: str) -> tuple[list[str], list[str]]:
    """(positive, negative) texts after the prompt template and caption cleaning, one pair per prompt."""
    from ..models.text import sampler_texts

    pairs = [sampler_texts(p, negative_prompt, version) for p in prompts]
    return [p for p, _ in pairs], [n for _, n in pairs]


def latent_shape(cfg: InferenceConfig) -> tuple[int, int, int, int]:
    """(C, t, h, w) of the requested `pipeline_config.input_size`, from the config alone (no VAE needed)."""
    frames, height, width = cfg.pipeline_config.input_size
    ft, fh, fw = cfg.ae.vae_scale_factor
    return cfg.ae.latent_dim, (frames - 1) // ft + 1, height // fh, width // fw


@dataclass
class Batch:
    """One micro-batch on its way through the stages: prompts in, latents out."""

    indices: list[int]
    prompts: list[str]
    positive: list[str] = field(default_factory=list)  # after the template and caption cleaning
    negative: list[str] = field(default_factory=list)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    uncond: Optional[dict[str, torch.Tensor]] = None  # None without classifier-free guidance
    noise: Optional[torch.Tensor] = None  # (B, C, t, h, w) fp32 on CPU
    start: Optional[torch.Tensor] = None  # the sampler's initial latents when they are not `noise` (editing)
    condition: Optional[InpaintCondition] = None  # image-to-video only
    latents: Optional[torch.Tensor] = None  # (B, C, t, h, w) fp32 on CPU


@dataclass
class RunState:
    """What the stages share for the whole run: the merged config, this rank's place, the built models."""

    cfg: InferenceConfig
    ranks: Ranks
    owned: bool  # whether `setup` created the process groups (and `run` tears them down)
    text: Optional[TextConditioner] = None
    model: Optional[torch.nn.Module] = None
    vae: Optional[torch.nn.Module] = None
    sigmas: Optional[torch.Tensor] = None
    condition: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # given pixels and frame mask (inpaint model)
    edit: Optional[EditSource] = None  # the clip to edit (`--video --strength`)
    step_cache: Optional[StepCache] = None  # of the last `denoise`
    compiled: list = field(default_factory=list)  # the `--compile` wrappers
    compile_reported: bool = False
    decode_reported: bool = False
    timer: StageTimer = field(default_factory=StageTimer)
    written: list[Path] = field(default_factory=list)


class InferenceRunner:
    """Sampling as asked by parsed `args` (see `arguments.parse_args`): generate, decode saved latents, or benchmark."""

    def __init__(self, args: InferenceArgs):
        self.args = args
        self.request = args.condition_request()
        self.student = None  # the distilled student's schedule (`weights.recorded_student`), once set up
        self.edit = args.edit_request()
        self.state: Optional[RunState] = None

    def run(self) -> list[Path]:
        """All stages of the asked mode; the files written (the benchmark report on rank 0)."""
        self.setup()
        try:
            if self.args.decode_latents:
                return self.decode_saved()
            if self.args.benchmark:
                return self.benchmark()
            return self.generate()
        finally:
            release_parallel(self.state.owned)

    # -- setup and build ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """The JSON merged with the flags, then this rank's process groups."""
        args = self.args
        cfg = build_config(args)
        self.student = recorded_student(args.predictor_weights or cfg.predictor.from_pretrained, args.lora)
        if self.student is not None:  # its schedule, unless the flags say otherwise
            cfg = build_config(args, self.student.diffusion_overrides())
        acc = cfg.acceleration
        ranks, owned = init_parallel(args.tp, args.cp, cfg.seed, acc.cfg_parallel, acc.parallel_vae_decode)
        self.state = RunState(cfg, ranks, owned)
        if ranks.cfg is not None:
            pairs = describe_pairs(ranks.cfg)  # collective
            if ranks.dims.rank == 0:
                logger.info("--cfg-parallel: %s", pairs)
        if args.size_preset and ranks.dims.rank == 0:
            frames, height, width = cfg.pipeline_config.input_size
            print(f"size preset -> frames {frames}, height {height}, width {width}")

    def build(self, decode: bool) -> None:
        """Text encoders, the predictor (weights, LoRA, compile) and, on the ranks that `decode` (or encode an
        image-to-video condition or the clip to edit), the VAE, with the accelerations the config asks for."""
        from ..config.dtypes import to_torch_dtype
        from ..diffusion import FlowMatchingScheduler
        from ..models.ae import VideoAutoencoder

        state, args = self.state, self.args
        cfg = state.cfg
        platform.silence_third_party()
        weights = args.predictor_weights or cfg.predictor.from_pretrained
        if not weights:
            raise ConfigError(args.config, "predictor.from_pretrained",
                              "no predictor weights: set it or pass --predictor-weights")
        conditioned = cfg.predictor.conditioned
        if self.request.any and not conditioned:
            raise ConfigError(args.config, "predictor.model_id", "--image/--last-image/--video --condition-frames need "
                              f"the image-to-video predictor \"SparseUMMDiTInpaint\", got {cfg.predictor.model_id!r}")
        # the given frames and the clip to edit first, so that an unreadable file fails before any model is built;
        # without given frames the inpaint model samples text-to-video (every frame generated, as t2iv training)
        size = cfg.pipeline_config.input_size
        state.condition = condition_pixels(self.request, *size) if conditioned else None
        edit_clip = None if self.edit is None else edit_pixels(self.edit.video, *size)
        device, dtype = platform.device(), to_torch_dtype(cfg.weight_dtype)
        state.text = self._build_text(dtype, device)
        state.model = self._build_predictor(weights, dtype, device)
        # every rank encodes the condition or the edited clip (posterior mean: the same on TP peers), writers decode
        if conditioned or self.edit is not None or (decode and state.ranks.decodes):
            state.vae = VideoAutoencoder(cfg.ae).to(device)
        _, _, h, w = latent_shape(cfg)
        state.sigmas = FlowMatchingScheduler(cfg.diffusion).sampling_sigmas(latent_hw=(h, w))
        if self.edit is not None:
            state.edit = EditSource.encode(state.vae, edit_clip, state.sigmas, self.edit.strength)

    def _build_text(self, dtype: torch.dtype, device: torch.device) -> TextConditioner:
        import dataclasses

        from ..models.text import TextEncoders, load_tokenizer

        cfg = self.state.cfg
        if (cfg.text_encoder_2 is None) != (cfg.tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 must both be given or both be absent")
        text_encoder = dataclasses.replace(cfg.text_encoder, use_attention_mask=cfg.pipeline_config.use_attention_mask)
        encoders = TextEncoders.from_config(text_encoder, cfg.text_encoder_2, dtype=dtype).to(device)
        tokenizer_2 = load_tokenizer(cfg.tokenizer_2) if cfg.tokenizer_2 is not None else None
        return TextConditioner(encoders, load_tokenizer(cfg.tokenizer), tokenizer_2, cfg.model_max_length)

    def _build_predictor(self, weights: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        from ..checkpoint.weights import load_predictor_shard
        from ..models.predictor import build_predictor
        from .compile import compile_blocks
        from .weights import apply_adapters

        cfg, args = self.state.cfg, self.args
        dims = self.state.ranks.dims
        model = build_predictor(cfg.predictor, load_predictor_shard(weights, dims.tp_rank, dims.tp), dtype, device,
                                sequence_parallel=dims.tp > 1, dims=dims, tp_local=True)
        if args.lora:
            apply_adapters(model, args.lora, args.lora_scale)
        if cfg.acceleration.compile:  # after the adapters, so that the compiled blocks include them
            self.state.compiled = compile_blocks(model, cfg.acceleration.compile_mode)
            if dims.rank == 0:
                logger.info("--compile: compiling %d blocks (mode %s) during the first denoising step...",
                            len(self.state.compiled), cfg.acceleration.compile_mode)
        return model

    # -- the stages of one micro-batch -------------------------------------------------------------------------

    def encode_prompt(self, indices: Sequence[int], prompts: Sequence[str]) -> Batch:
        """Template and clean the texts, encode [negative; positive] in one call, draw the seeded noise."""
        cfg, state = self.state.cfg, self.state
        batch = Batch(list(indices), list(prompts))
        batch.positive, batch.negative = prepare_texts(prompts, cfg.negative_prompt, cfg.pipeline_config.version)
        guided = cfg.diffusion.guidance_scale > 1.0
        with state.timer.time("text_encode"):
            # [negative; positive] in one encoder call, split again for the sampler's [uncond; cond] batch.
            emb = state.text.encode(batch.negative + batch.positive if guided else batch.positive)
        b = len(prompts)
        batch.uncond = {k: v[:b] for k, v in emb.items()} if guided else None
        batch.cond = {k: v[-b:] for k, v in emb.items()}
        batch.noise = initial_noise(latent_shape(cfg), cfg.seed, batch.indices)
        return batch

    def prepare_condition(self, batch: Batch) -> None:
        """Image-to-video: the given frames through the VAE into the inpaint predictor's condition. Editing: the
        clip's latents noised to the start sigma with this batch's noise."""
        if self.state.condition is not None:
            batch.condition = InpaintCondition.encode(self.state.vae, *self.state.condition, batch.noise,
                                                      self.request.reimpose)
        if self.state.edit is not None:
            batch.start = self.state.edit.start_latents(batch.noise)

    def denoise(self, batch: Batch, progress: bool) -> None:
        """The Euler CFG loop (step cache and CFG-parallel as configured); one `denoise_step` time per step."""
        from tqdm.auto import tqdm

        state = self.state
        diffusion, acc = state.cfg.diffusion, state.cfg.acceleration
        first = 0 if state.edit is None else state.edit.start  # editing skips the schedule's first steps
        sigmas = state.sigmas[first:]
        bar = tqdm(total=sigmas.numel() - 1, desc=f"prompt {batch.indices[0]}", disable=not progress, file=sys.stderr)
        platform.synchronize()
        last = [time.perf_counter()]

        def on_step(step: int, num_steps: int, latents: torch.Tensor) -> None:
            platform.synchronize()
            now = time.perf_counter()
            if state.timer.enabled:
                state.timer.samples["denoise_step"].append(now - last[0])
            if state.compiled and not state.compile_reported and state.ranks.dims.rank == 0:
                from .compile import compile_summary

                logger.info("--compile: %s", compile_summary(state.compiled, now - last[0]))
            state.compile_reported = True
            last[0] = now
            bar.update(1)

        group = state.ranks.cfg.group if state.ranks.cfg is not None else None
        state.step_cache = None if acc.cache_threshold is None else StepCache(
            state.model, acc.cache_threshold, diffusion.num_inference_steps, group, first_step=first)
        start = batch.noise if batch.start is None else batch.start
        batch.latents = denoise(state.model, start, batch.cond, batch.uncond, sigmas,
                                diffusion.guidance_scale, diffusion.guidance_rescale, on_step,
                                step_cache=state.step_cache, cfg_parallel=state.ranks.cfg,
                                condition=batch.condition).cpu()
        bar.close()
        cache = state.step_cache
        if cache is not None and state.ranks.writer:
            logger.info("--cache-threshold %g: prompt %s skipped %d of %d steps %s", acc.cache_threshold,
                        batch.indices[0], len(cache.skipped), cache.steps_run, cache.skipped)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, C, t, h, w) latents -> (B, 3, T, H, W) videos in [-1, 1] (fp32, CPU). Under `--parallel-vae-decode`
        the replica's ranks share the decode (all call) and only its first rank gets the video (others: None)."""
        vae = self.state.vae
        if self.state.cfg.acceleration.parallel_vae_decode and not self.state.decode_reported:
            self._report_decode_plan(latents.shape[2])
        video = vae.decode(latents.to(next(vae.parameters()).device), self.state.ranks.decode_group)
        return None if video is None else video.float().clamp(-1, 1).cpu()

    def _report_decode_plan(self, length: int) -> None:
        """Say once, on rank 0, whether `--parallel-vae-decode` splits the decode, and why not."""
        import torch.distributed as dist

        from ..models.ae.parallel_decode import decoder_history, describe_plan

        state = self.state
        state.decode_reported = True
        group = state.ranks.decode_group
        if state.ranks.dims.rank != 0:
            return
        ranks = dist.get_world_size(group) if group is not None else 1
        history = decoder_history(state.vae.vae) if ranks > 1 else 0
        logger.info("--parallel-vae-decode: %s", describe_plan(length, ranks, history))

    def write(self, stem: str, record: dict, latents: Optional[torch.Tensor] = None,
              video: Optional[torch.Tensor] = None) -> Path:
        """`<stem>.safetensors` (latents) or `<stem>.mp4` (H.264) + its `<stem>.json` sidecar (video) in the save
        path, each written atomically."""
        from .video_io import to_uint8_frames, write_json_atomic, write_mp4

        save_dir = Path(self.state.cfg.save_path)
        if latents is not None:
            path = save_latents(save_dir / f"{stem}.safetensors", latents, record)
        else:
            fps = record.get("fps", self.state.cfg.output_fps)
            path = write_mp4(save_dir / f"{stem}.mp4", to_uint8_frames(video), fps)
            write_json_atomic(save_dir / f"{stem}.json", {**record, "video": path.name})
        self.state.written.append(path)
        logger.info("wrote %s", path)
        return path

    # -- modes -------------------------------------------------------------------------------------------------

    def sample(self, indices: Sequence[int], prompts: Sequence[str], progress: bool) -> Batch:
        """The stages up to clean latents: encode prompt, prepare condition, denoise."""
        batch = self.encode_prompt(indices, prompts)
        self.prepare_condition(batch)
        self.denoise(batch, progress)
        return batch

    def generate(self) -> list[Path]:
        """This replica's prompts (prompt i goes to replica i mod replicas), micro-batch by micro-batch."""
        state, save_latents_only = self.state, self.args.save_latents
        prompts = load_prompts(state.cfg.prompt)
        self.build(decode=not save_latents_only)
        ranks = state.ranks
        mine = [i for i in range(len(prompts)) if i % ranks.num_replicas == ranks.replica]
        size = state.cfg.micro_batch_size
        for chunk in [mine[i:i + size] for i in range(0, len(mine), size)]:
            batch = self.sample(chunk, [prompts[i] for i in chunk], progress=ranks.dims.rank == 0)
            for b, index in enumerate(batch.indices):
                record = self._record(batch, b)
                if save_latents_only and ranks.writer:
                    self.write(f"{index:06d}", record, latents=batch.latents[b])
                elif not save_latents_only and ranks.decodes:
                    video = self.decode(batch.latents[b:b + 1])
                    if ranks.writer:
                        record.update(self._input_report(video[0]))
                        self.write(f"{index:06d}", record, video=video[0])
        return state.written

    def decode_saved(self) -> list[Path]:
        """Saved latents (`--save-latents`) -> videos, VAE only. Files are split over replicas; the writer of
        each decodes (with the replica's other ranks under --parallel-vae-decode) and writes."""
        from ..models.ae import VideoAutoencoder

        state = self.state
        files = sorted(Path(self.args.decode_latents).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors latents in {self.args.decode_latents}")
        mine = files[state.ranks.replica::state.ranks.num_replicas] if state.ranks.decodes else []
        if mine:
            state.vae = VideoAutoencoder(state.cfg.ae).to(platform.device())
        for path in mine:
            saved = load_latents(path)
            video = self.decode(saved.latents[None])
            if state.ranks.writer:
                record = {**saved.record, "decoded_from": str(path), "vae_dtype": state.cfg.ae.dtype}
                self.write(path.stem, record, video=video[0])
        return state.written

    def benchmark(self) -> list[Path]:
        """`warmup` untimed then `repeat` timed full runs on the first micro-batch of prompts; report on rank 0."""
        from .video_io import write_json_atomic

        state, args = self.state, self.args
        prompts = load_prompts(state.cfg.prompt)
        indices = list(range(min(state.cfg.micro_batch_size, len(prompts))))
        self.build(decode=True)
        platform.reset_peak_memory_stats()
        timer = state.timer
        for run in range(args.warmup + args.repeat):
            timer.enabled = run >= args.warmup
            with timer.time("total"):
                batch = self.sample(indices, [prompts[i] for i in indices], progress=state.ranks.dims.rank == 0)
                if state.vae is not None:
                    with timer.time("vae_decode"):
                        self.decode(batch.latents)
        if state.ranks.dims.rank != 0:
            return []
        report = self._benchmark_report(len(indices))
        path = Path(args.report) if args.report else Path(state.cfg.save_path) / "benchmark.json"
        write_json_atomic(path, report)
        for stage, s in report["stages"].items():
            print(f"{stage:>14}: mean {s['mean_s']:.4f}s  min {s['min_s']:.4f}s  max {s['max_s']:.4f}s  (n={s['count']})")
        print(f"report: {path}")
        return [path]

    # -- records -----------------------------------------------------------------------------------------------

    def _record(self, batch: Batch, b: int) -> dict:
        """The settings of sample `b` of `batch`: its JSON sidecar (or the latents file's metadata)."""
        cfg, args, ranks = self.state.cfg, self.args, self.state.ranks
        d, pc, index = cfg.diffusion, cfg.pipeline_config, batch.indices[b]
        return {
            "index": index, "prompt": batch.prompts[b], "positive_text": batch.positive[b],
            "negative_text": batch.negative[b], "seed": cfg.seed, "noise_seed": cfg.seed + index,
            "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
            "guidance_rescale": d.guidance_rescale, "shift": d.shift, "use_dynamic_shifting": d.use_dynamic_shifting,
            "use_linear_quadratic_schedule": d.use_linear_quadratic_schedule,
            "size": list(pc.input_size), "latent_shape": list(latent_shape(cfg)),
            "fps": cfg.output_fps, "weight_dtype": cfg.weight_dtype, "vae_dtype": cfg.ae.dtype,
            "tensor_model_parallel_size": ranks.dims.tp, "context_parallel_size": ranks.dims.cp,
            "config": str(args.config),
            "predictor_weights": str(args.predictor_weights or cfg.predictor.from_pretrained),
            "lora": str(args.lora) if args.lora else None, "lora_scale": args.lora_scale if args.lora else None,
            "student": None if self.student is None else self.student.to_record(),
            "acceleration": to_dict(cfg.acceleration),
            **({} if self.state.edit is None else {"edit": self.state.edit.record(self.edit)}),
        }

    def _input_report(self, video: torch.Tensor) -> dict:
        """The PSNR of the given frames (image-to-video) or of the edited clip in the output and after the VAE round
        trip, printed too."""
        edit = self.state.edit
        if edit is not None:
            frames = edit.pixels.shape[1]
            report = condition_report(video, edit.pixels, torch.zeros(frames), self.state.vae)
            del report["condition_frames"]
            print(f"edit of {self.edit.video} at strength {self.edit.strength:g} ({edit.steps} of "
                  f"{self.state.sigmas.numel() - 1} steps): PSNR output vs input {report['psnr_output_db']:.2f} dB, "
                  f"VAE round trip {report['psnr_vae_round_trip_db']:.2f} dB")
            return {"edit": {**edit.record(self.edit), **report}}
        if self.state.condition is None or not self.request.any:
            return {}
        report = condition_report(video, *self.state.condition, self.state.vae)
        print(f"condition frames {report['condition_frames']}: PSNR output vs input "
              f"{report['psnr_output_db']:.2f} dB, VAE round trip {report['psnr_vae_round_trip_db']:.2f} dB")
        request = self.request
        return {"condition": {"image": request.image, "last_image": request.last_image, "video": request.video,
                              "reimpose": request.reimpose, **report}}

    def _benchmark_report(self, batch_size: int) -> dict:
        from ..config.dtypes import to_torch_dtype

        cfg, ranks, cache = self.state.cfg, self.state.ranks, self.state.step_cache
        report = {
            "device": str(platform.device()), "device_name": platform.device_name(),
            "accelerator": platform.accelerator(), "weight_dtype": str(to_torch_dtype(cfg.weight_dtype)),
            "vae_dtype": cfg.ae.dtype, "tensor_model_parallel_size": ranks.dims.tp,
            "context_parallel_size": ranks.dims.cp, "data_parallel_size": ranks.dims.dp, "batch_size": batch_size,
            "input_size": list(cfg.pipeline_config.input_size), "latent_shape": list(latent_shape(cfg)),
            "num_inference_steps": cfg.diffusion.num_inference_steps,
            "guidance": cfg.diffusion.guidance_scale > 1.0, "warmup": self.args.warmup, "repeat": self.args.repeat,
            "torch_threads": torch.get_num_threads(), "stages": self.state.timer.summary(),
            "peak_memory": peak_memory(), "acceleration": to_dict(cfg.acceleration),
        }
        if cache is not None:
            report["step_cache"] = {"threshold": cache.threshold, "skipped_steps": cache.skipped,
                                    "skipped_fraction": cache.skipped_fraction}
        return report


__all__ = ["Batch", "InferenceRunner", "RunState", "latent_shape", "prepare_texts"]
