"""`inference.py` / `osp-inference`: Open-Sora Plan v1.5 text-to-video sampling (single process or torchrun).

    inference.py --config examples/tiny/inference.json --prompt "a cat" --save-path out/
    torchrun --nproc_per_node 2 inference.py --config ... --tensor-model-parallel-size 2
    torchrun --nproc_per_node 4 inference.py --config ... --tensor-model-parallel-size 2 --context-parallel-size 2
    inference.py --config ... --save-latents --save-path lat/      # stage 1: text encoders + predictor only
    inference.py --config ... --decode-latents lat/ --save-path vid/  # stage 2: VAE only
    inference.py --config ... --benchmark --warmup 1 --repeat 3 --report bench.json

Prompts (`--prompt` file, one per line, or a literal) are split over replicas (prompt i goes to replica
i mod replicas); a replica is one TP x CP group (all its ranks run the same pipeline on identical inputs; CP ranks
each hold a part of the video sequence inside the predictor), or with `--cfg-parallel` a pair of them running the
unconditional and conditional branch. Only TP rank 0 / CP rank 0 of a replica (of its unconditional branch)
writes, so every file has one writer; it also decodes, together with the replica's other ranks under
`--parallel-vae-decode`. Accelerations: docs/inference_acceleration.md.
Output per prompt i: `{i:06d}.mp4` + `{i:06d}.json` (settings), or
`{i:06d}.safetensors` with `--save-latents`. Every file is written atomically and none is ever deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import platform
from ..config import AccelerationConfig, ConfigError, InferenceConfig, to_dict
from ..diffusion.step_cache import StepCache
from .arguments import InferenceArgs, build_config, parse_args
from .benchmark import StageTimer, peak_memory
from .conditioning import InpaintCondition, condition_pixels, condition_report
from .cfg_parallel import CfgParallelGroup, group_by, init_cfg_parallel
from .compile import compile_blocks
from .pipeline import (
    TextConditioner,
    decode,
    denoise,
    initial_noise,
    latent_shape,
    load_latents,
    load_prompts,
    prepare_texts,
    save_latents,
    write_video,
)

logger = logging.getLogger("mindspeed_mm_osp.inference")


@dataclass(frozen=True)
class Ranks:
    """Where this rank sits. A *replica* runs the whole pipeline for its share of the prompts: one TP group, or
    with CFG-parallel the two TP groups of a CFG pair (`cfg`). `decode_group` (parallel VAE decode) holds every
    rank of the replica; without it only the writer decodes."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    rank: int = 0
    cfg: Optional[CfgParallelGroup] = None
    decode_group: Optional[torch.distributed.ProcessGroup] = None
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def replica(self) -> int:
        return self.dp_rank if self.cfg is None else self.cfg.replica

    @property
    def num_replicas(self) -> int:
        return self.dp_size if self.cfg is None else self.cfg.num_replicas

    @property
    def writer(self) -> bool:
        """TP rank 0 / CP rank 0 of the (unconditional branch of the) replica: the one rank that writes its files."""
        return self.tp_rank == 0 and self.cp_rank == 0 and (self.cfg is None or self.cfg.branch == 0)

    @property
    def decodes(self) -> bool:
        return self.writer or self.decode_group is not None


def init_parallel(tp: int, seed: int, acceleration: AccelerationConfig, cp: int = 1) -> tuple[Ranks, bool]:
    """(ranks, whether we initialised torch.distributed). Single process without TP/CP needs no process group."""
    import torch.distributed as dist

    from ..parallel import ParallelConfigError, initialize_distributed

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1 and tp == cp == 1:
        if acceleration.cfg_parallel:
            raise ParallelConfigError("--cfg-parallel needs 2 x TP ranks (e.g. torchrun --nproc_per_node 2)")
        return Ranks(), False
    owned = not dist.is_initialized()
    initialize_distributed(tp=tp, cp=cp, seed=seed)
    from megatron.core import parallel_state as ps

    have = (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size())
    if have != (tp, cp):
        raise ParallelConfigError(f"torch.distributed is already set up with TP={have[0]} CP={have[1]}, but "
                                  f"--tensor-model-parallel-size {tp} --context-parallel-size {cp} was asked")
    ranks = Ranks(ps.get_tensor_model_parallel_rank(), tp, ps.get_data_parallel_rank(),
                  ps.get_data_parallel_world_size(), dist.get_rank(),
                  init_cfg_parallel() if acceleration.cfg_parallel else None,
                  cp_rank=ps.get_context_parallel_rank(), cp_size=cp)
    if acceleration.parallel_vae_decode:
        group = group_by(ranks.replica)
        if (dist.get_rank(group) == 0) != ranks.writer:
            raise ParallelConfigError("parallel VAE decode: the replica's first rank is not its writer (unexpected "
                                      "megatron rank order)")
        ranks = dataclasses.replace(ranks, decode_group=group)
    return ranks, owned


def _record(cfg: InferenceConfig, args: InferenceArgs, index: int, prompt: str, positive: str,
            negative: str, ranks: Ranks) -> dict:
    d, pc = cfg.diffusion, cfg.pipeline_config
    return {
        "index": index, "prompt": prompt, "positive_text": positive, "negative_text": negative,
        "seed": cfg.seed, "noise_seed": cfg.seed + index, "num_inference_steps": d.num_inference_steps,
        "guidance_scale": d.guidance_scale, "guidance_rescale": d.guidance_rescale, "shift": d.shift,
        "use_dynamic_shifting": d.use_dynamic_shifting,
        "use_linear_quadratic_schedule": d.use_linear_quadratic_schedule,
        "size": list(pc.input_size), "latent_shape": list(latent_shape(cfg)),
        "fps": cfg.output_fps, "weight_dtype": cfg.weight_dtype, "vae_dtype": cfg.ae.dtype,
        "tensor_model_parallel_size": ranks.tp_size, "context_parallel_size": ranks.cp_size,
        "config": str(args.config),
        "predictor_weights": str(args.predictor_weights or cfg.predictor.from_pretrained),
        "lora": str(args.lora) if args.lora else None, "lora_scale": args.lora_scale if args.lora else None,
        "acceleration": to_dict(cfg.acceleration),
    }


class Generator:
    """Text encoders + predictor (and the VAE on decoding ranks unless latents are saved), with the configured
    accelerations: compiled blocks, step cache, CFG-parallel."""

    def __init__(self, cfg: InferenceConfig, args: InferenceArgs, ranks: Ranks, build_vae: bool):
        from ..models.ae import VideoAutoencoder
        from ..config.dtypes import to_torch_dtype
        from ..models.predictor import build_predictor
        from ..checkpoint.weights import load_predictor_weights
        from .weights import apply_adapters

        weights = args.predictor_weights or cfg.predictor.from_pretrained
        if not weights:
            raise ConfigError(args.config, "predictor.from_pretrained",
                              "no predictor weights: set it or pass --predictor-weights")
        self.request = args.condition_request()
        conditioned = cfg.predictor.conditioned
        if self.request.any and not conditioned:
            raise ConfigError(args.config, "predictor.model_id", f"--image/--last-image/--video need the image-to-video "
                              f"predictor \"SparseUMMDiTInpaint\", got {cfg.predictor.model_id!r}")
        self.cfg, self.args, self.ranks = cfg, args, ranks
        device, dtype = platform.device(), to_torch_dtype(cfg.weight_dtype)
        self.text = TextConditioner(cfg, dtype, device)
        self.model = build_predictor(cfg.predictor, load_predictor_weights(weights), dtype, device,
                                     sequence_parallel=ranks.tp_size > 1)
        if args.lora:
            apply_adapters(self.model, args.lora, args.lora_scale)
        if cfg.acceleration.compile:  # after the adapters, so that the compiled blocks include them
            compile_blocks(self.model, cfg.acceleration.compile_mode)
        # every rank encodes the condition (posterior mean: the same on TP peers), writers also decode
        build_vae = conditioned or (build_vae and ranks.decodes)
        self.vae = VideoAutoencoder(cfg.ae).to(device) if build_vae else None
        # without given frames the inpaint model samples text-to-video (every frame generated, as t2iv training)
        self.condition = condition_pixels(self.request, *cfg.pipeline_config.input_size) if conditioned else None
        self.last_cache: Optional[StepCache] = None  # the step cache of the last `sample` call

    def sample(self, indices: Sequence[int], prompts: Sequence[str], timer: StageTimer,
               progress: bool) -> tuple[torch.Tensor, list[dict]]:
        """Latents (B, C, t, h, w) fp32 on CPU and one settings record per prompt."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        positive, negative = prepare_texts(prompts, cfg.negative_prompt, cfg.pipeline_config.version)
        guided = cfg.diffusion.guidance_scale > 1.0
        with timer.time("text_encode"):
            # [negative; positive] in one encoder call, split again for the sampler's [uncond; cond] batch.
            emb = self.text.encode(negative + positive if guided else positive)
        b = len(prompts)
        uncond = {k: v[:b] for k, v in emb.items()} if guided else None
        cond = {k: v[-b:] for k, v in emb.items()}
        noise = initial_noise(latent_shape(cfg), cfg.seed, indices)
        bar = tqdm(total=cfg.diffusion.num_inference_steps, desc=f"prompt {indices[0]}", disable=not progress,
                   file=sys.stderr)
        last = [time.perf_counter()]

        def on_step(step: int, num_steps: int, latents: torch.Tensor) -> None:
            platform.synchronize()
            now = time.perf_counter()
            if timer.enabled:
                timer.samples["denoise_step"].append(now - last[0])
            last[0] = now
            bar.update(1)

        platform.synchronize()
        last[0] = time.perf_counter()
        threshold = cfg.acceleration.cache_threshold
        group = self.ranks.cfg.group if self.ranks.cfg is not None else None
        self.last_cache = None if threshold is None else StepCache(self.model, threshold,
                                                                  cfg.diffusion.num_inference_steps, group)
        condition = None if self.condition is None else InpaintCondition.encode(
            self.vae, *self.condition, noise, self.request.reimpose)
        latents = denoise(self.model, noise, cond, uncond, cfg, callback=on_step, step_cache=self.last_cache,
                          cfg_parallel=self.ranks.cfg, condition=condition).cpu()
        bar.close()
        records = [_record(cfg, self.args, i, p, pos, neg, self.ranks)
                   for i, p, pos, neg in zip(indices, prompts, positive, negative)]
        return latents, records


    def condition_report(self, video: torch.Tensor) -> dict:
        """Image-to-video: the given frames' PSNR in the output and after the VAE round trip, printed too."""
        if self.condition is None or not self.request.any:
            return {}
        report = condition_report(video, *self.condition, self.vae)
        print(f"condition frames {report['condition_frames']}: PSNR output vs input "
              f"{report['psnr_output_db']:.2f} dB, VAE round trip {report['psnr_vae_round_trip_db']:.2f} dB")
        request = self.request
        return {"condition": {"image": request.image, "last_image": request.last_image, "video": request.video,
                              "reimpose": request.reimpose, **report}}


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def generate(cfg: InferenceConfig, args: InferenceArgs, ranks: Ranks) -> list[Path]:
    prompts = load_prompts(cfg.prompt)
    gen = Generator(cfg, args, ranks, build_vae=not args.save_latents)
    save_dir, fps = Path(cfg.save_path), cfg.output_fps
    mine = [i for i in range(len(prompts)) if i % ranks.num_replicas == ranks.replica]
    written = []
    for batch in _chunks(mine, cfg.micro_batch_size):
        latents, records = gen.sample(batch, [prompts[i] for i in batch], StageTimer(), progress=ranks.rank == 0)
        for b, (index, record) in enumerate(zip(batch, records)):
            if args.save_latents and ranks.writer:
                written.append(save_latents(save_dir / f"{index:06d}.safetensors", latents[b], record))
            elif not args.save_latents and ranks.decodes:
                video = decode(gen.vae, latents[b:b + 1], ranks.decode_group)
                if ranks.writer:
                    record.update(gen.condition_report(video[0]))
                    written.append(write_video(save_dir, f"{index:06d}", video[0], fps, record))
            if ranks.writer:
                logger.info("wrote %s", written[-1])
    return written


def decode_saved(cfg: InferenceConfig, args: InferenceArgs, ranks: Ranks) -> list[Path]:
    """Stage 2: VAE only. Files are split over replicas; the writer of each decodes (with the replica's other
    ranks under --parallel-vae-decode) and writes."""
    from ..models.ae import VideoAutoencoder

    files = sorted(Path(args.decode_latents).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors latents in {args.decode_latents}")
    mine = files[ranks.replica::ranks.num_replicas] if ranks.decodes else []
    written = []
    if mine:
        vae = VideoAutoencoder(cfg.ae).to(platform.device())
        save_dir = Path(cfg.save_path)
        for path in mine:
            saved = load_latents(path)
            video = decode(vae, saved.latents[None], ranks.decode_group)
            if not ranks.writer:
                continue
            video = video[0]
            record = {**saved.record, "decoded_from": str(path), "vae_dtype": cfg.ae.dtype}
            fps = saved.record.get("fps", cfg.output_fps)
            written.append(write_video(save_dir, path.stem, video, fps, record))
            logger.info("wrote %s", written[-1])
    return written


def benchmark(cfg: InferenceConfig, args: InferenceArgs, ranks: Ranks) -> Optional[Path]:
    """`warmup` untimed then `repeat` timed full runs on the first micro-batch of prompts; report on rank 0."""
    from ..config.dtypes import to_torch_dtype
    from .video_io import write_json_atomic

    prompts = load_prompts(cfg.prompt)
    indices = list(range(min(cfg.micro_batch_size, len(prompts))))
    gen = Generator(cfg, args, ranks, build_vae=True)
    platform.reset_peak_memory_stats()
    timer = StageTimer()
    for run in range(args.warmup + args.repeat):
        timer.enabled = run >= args.warmup
        with timer.time("total"):
            latents, _ = gen.sample(indices, [prompts[i] for i in indices], timer, progress=ranks.rank == 0)
            if gen.vae is not None:
                with timer.time("vae_decode"):
                    decode(gen.vae, latents, ranks.decode_group)
    if ranks.rank != 0:
        return None
    report = {
        "device": str(platform.device()), "device_name": platform.device_name(),
        "accelerator": platform.accelerator(), "weight_dtype": str(to_torch_dtype(cfg.weight_dtype)),
        "vae_dtype": cfg.ae.dtype, "tensor_model_parallel_size": ranks.tp_size, "context_parallel_size": ranks.cp_size,
        "data_parallel_size": ranks.dp_size, "batch_size": len(indices),
        "input_size": list(cfg.pipeline_config.input_size), "latent_shape": list(latent_shape(cfg)),
        "num_inference_steps": cfg.diffusion.num_inference_steps,
        "guidance": cfg.diffusion.guidance_scale > 1.0, "warmup": args.warmup, "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(), "stages": timer.summary(), "peak_memory": peak_memory(),
        "acceleration": to_dict(cfg.acceleration),
    }
    if gen.last_cache is not None:
        report["step_cache"] = {"threshold": gen.last_cache.threshold, "skipped_steps": gen.last_cache.skipped,
                                "skipped_fraction": gen.last_cache.skipped_fraction}
    path = Path(args.report) if args.report else Path(cfg.save_path) / "benchmark.json"
    write_json_atomic(path, report)
    for stage, s in report["stages"].items():
        print(f"{stage:>14}: mean {s['mean_s']:.4f}s  min {s['min_s']:.4f}s  max {s['max_s']:.4f}s  (n={s['count']})")
    print(f"report: {path}")
    return path


def run(args: InferenceArgs) -> None:
    """Merge the config, set up TP/DP, run the asked stage (generate, decode saved latents, or benchmark)."""
    cfg = build_config(args)
    ranks, owned = init_parallel(args.tp, cfg.seed, cfg.acceleration, args.cp)
    if args.size_preset and ranks.rank == 0:
        frames, height, width = cfg.pipeline_config.input_size
        print(f"size preset -> frames {frames}, height {height}, width {width}")
    try:
        if args.decode_latents:
            decode_saved(cfg, args, ranks)
        elif args.benchmark:
            benchmark(cfg, args, ranks)
        else:
            generate(cfg, args, ranks)
    finally:
        if owned:
            from ..parallel import destroy_distributed

            destroy_distributed()


def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..errors import user_errors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (*user_errors(), FileNotFoundError) as e:
        print(f"inference.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
