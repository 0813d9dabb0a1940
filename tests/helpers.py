"""Pieces several test modules share (tests import them as `from helpers import ...`; `tests/` is on sys.path
because `tests/conftest.py` lives there).

* numpy references of the video metrics (PSNR, SSIM);
* a two-layer tensor-parallel toy model, its batches and one training step, for the optimizer and checkpoint tests;
* the seven-stage tiny predictor's inputs, configs and single-process reference for parallel-vs-single tests;
* launcher and training-run helpers (the release launcher's argv, a short tiny run's flags, its final weights);
* the tiny inference setup (models, random predictor weights, inference JSON) and a rank body running the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict
from mindspeed_mm_osp.optim import OptimizerSettings, clip_and_step
from mindspeed_mm_osp.testing import TINY_PREDICTOR_7_STAGES, perturb_parameters, tiny_predictor_config


# ---- video metrics: independent numpy references ----

def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return w / w.sum()


def ssim_plane_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one float plane: weighted window statistics over every full 11x11 window."""
    w = gaussian_window()
    px = np.lib.stride_tricks.sliding_window_view(x, w.shape)  # (H-10, W-10, 11, 11)
    py = np.lib.stride_tricks.sliding_window_view(y, w.shape)
    mx, my = np.einsum("ijkl,kl->ij", px, w), np.einsum("ijkl,kl->ij", py, w)
    vx = np.einsum("ijkl,kl->ij", (px - mx[..., None, None]) ** 2, w)
    vy = np.einsum("ijkl,kl->ij", (py - my[..., None, None]) ** 2, w)
    cxy = np.einsum("ijkl,kl->ij", (px - mx[..., None, None]) * (py - my[..., None, None]), w)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(m.mean())


def luma(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def ssim_reference(a: np.ndarray, b: np.ndarray, channels: str = "y") -> float:
    if channels == "y":
        return float(np.mean([ssim_plane_reference(x, y) for x, y in zip(luma(a), luma(b))]))
    return float(np.mean([np.mean([ssim_plane_reference(x[..., c].astype(np.float64), y[..., c].astype(np.float64))
                                   for c in range(3)]) for x, y in zip(a, b)]))


def psnr_reference(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


# ---- optimizer and checkpoint tests: a tensor-parallel toy model ----

HIDDEN, FFN, SEQ, BATCH = 8, 24, 3, 4
EMA_DECAY = 0.9


class TinyTP(nn.Module):
    """Column -> GELU -> Row -> LayerNorm: TP-sharded weights, a row bias and replicated 1-D params."""

    def __init__(self, config):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        init = nn.init.normal_
        self.fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=lambda w: init(w, std=0.3),
                                        bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=lambda w: init(w, std=0.3),
                                     bias=True, input_is_parallel=True, skip_bias_add=False)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(h))
        return self.norm(y + x)


class PlainTiny(nn.Module):
    """The same function with torch layers (TP=1): the single-process reference."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN), nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.nn.functional.gelu(self.fc1(x))) + x)


def make_model(bf16: bool = False, use_distributed_optimizer: bool = False):
    """(megatron DDP model, plain fp32 copy of the same weights taken before wrapping; None at TP > 1)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_mm_osp.parallel import make_transformer_config

    dtype = torch.bfloat16 if bf16 else torch.float32
    config = make_transformer_config(num_heads=2, hidden_size=HIDDEN, params_dtype=dtype)
    torch.manual_seed(7)
    module = TinyTP(config).to(dtype)
    reference = None
    if config.tensor_model_parallel_size == 1:
        reference = PlainTiny()
        reference.load_state_dict({k: v.float() for k, v in module.state_dict().items() if "_extra_state" not in k})
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer,
                                               grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    return DistributedDataParallel(config, ddp_config, module), reference


def batch(step: int, rank: int, world_size: int, dtype=torch.float32) -> torch.Tensor:
    """This rank's slice of the global batch of `step` (identical global batch on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    full = torch.randn(SEQ, BATCH * 2, HIDDEN, generator=g)
    per = full.shape[1] // world_size
    return full[:, rank * per:(rank + 1) * per].to(dtype)


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean() + out.float().mean()


def settings(**kw) -> OptimizerSettings:
    base = dict(lr=2e-2, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, ema_decay=EMA_DECAY,
                clip_grad=0.0, clip_grad_ema_decay=0.0, train_iters=100)
    base.update(kw)
    return OptimizerSettings(**base)


def train_step(model, optimizer, clip, step: int, rank: int, world_size: int, poison: bool = False):
    from megatron.core.distributed import finalize_model_grads

    model.zero_grad_buffer()
    optimizer.zero_grad()
    dtype = next(model.parameters()).dtype
    loss = loss_fn(model(batch(step, rank, world_size, dtype)))
    if poison:
        loss = loss * float("nan")
    loss.backward()
    finalize_model_grads([model])
    return clip_and_step(optimizer, clip)


# ---- predictor parallel-vs-single tests ----

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_config(**overrides):
    """`PredictorConfig` of the seven-stage tiny predictor with `overrides`."""
    return tiny_predictor_config(TINY_PREDICTOR_7_STAGES, **overrides)


def make_inputs(seed, frames, height, width, text, channels=4):
    g = torch.Generator().manual_seed(seed)
    video_mask = torch.ones(2, frames, height, width)
    video_mask[1, -1] = 0
    text_mask = torch.ones(2, 1, text)
    text_mask[1, :, -3:] = 0
    inputs = (torch.randn(2, channels, frames, height, width, generator=g), torch.tensor([0.0, 731.5]),
              torch.randn(2, 1, text, 24, generator=g), video_mask, text_mask, torch.randn(2, 1, 16, generator=g))
    return inputs, torch.randn(2, 4, frames, height, width, generator=g)  # loss weights


# L=18, S=8 (config A); L=9, S=7: neither divisible by TP=2, so SP pads.
CASES = [make_inputs(0, 3, 4, 6, 8), make_inputs(1, 3, 2, 6, 7)]
# The image-to-video variant: [noisy | masked latent | 2 mask channels] = 10 input channels.
I2V = {"model_id": "SparseUMMDiTInpaint", "vae_scale_factor_t": 2}
I2V_CASES = [make_inputs(0, 3, 4, 6, 8, channels=10), make_inputs(1, 3, 2, 6, 7, channels=10)]


def reference(cfg, cases=CASES):
    """TP=1 model without torch.distributed, randomised weights; per case: output and param grads."""
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).train()
    perturb_parameters(model, torch.Generator().manual_seed(1))
    results = []
    for inputs, weight in cases:
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        (out * weight).sum().backward()
        results.append((out.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                       for n, p in model.named_parameters()}))
    return local_state_dict(model), results


CONFIG_A = {}  # zero-init skips, double_ff, no final-block text params
CONFIG_B = {"skip_connection_zero_init": False, "double_ff": False, "final_block_text_params": True}


# ---- launchers and training runs ----

ROOT = Path(__file__).resolve().parents[1]


def launcher_argv(tmp_path, script: str = "examples/opensoraplan1.5/pretrain_opensoraplan1_5.sh") -> list[str]:
    """Run a real release launcher with a stand-in torchrun that records its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "argv.txt"
    (fake / "torchrun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (fake / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "NPUS_PER_NODE": "8", "NNODES": "2",
           "NODE_RANK": "1", "PROJECT_DIR": str(tmp_path / "proj")}
    subprocess.run(["bash", script], cwd=ROOT, env=env, check=True, capture_output=True)
    args = record.read_text().split("\n")[:-1]
    script = args.index("pretrain.py")
    assert args[:script] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr",
                             "localhost", "--master_port", "12345"]
    return args[script + 1:]


def training_argv(assets, *extra, iters=6, tp=1):
    """`pretrain.py` flags for a short run of the tiny assets (`tiny_assets` fixture) at TP `tp`."""
    return ["--mm-data", str(assets["data_json"]), "--mm-model", str(assets["model_json"]),
            "--tensor-model-parallel-size", str(tp), "--micro-batch-size", "1", "--train-iters", str(iters),
            "--lr", "1e-4", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1", *extra]


def train_and_record(rank, world_size, argv, with_weights: bool = False) -> dict:
    """A rank's training run through `Trainer`: its losses and grad norms per iteration (and final local weights)."""
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import Trainer

    norms = []

    class RecordingTrainer(Trainer):
        def log(self, step):
            norms.append(step.clip.grad_norm)
            super().log(step)

    trainer = RecordingTrainer(parse_args(argv, world_size=world_size))
    result = trainer.fit()
    out = {"losses": result.losses, "grad_norms": norms}
    if with_weights:
        out["weights"] = {k: v.detach().clone() for k, v in trainer.ddp.module.state_dict().items() if torch.is_tensor(v)}
    return out


def final_weights(save_dir):
    """(iteration, model, EMA) of the rank-0 file of the latest checkpoint in `save_dir`."""
    from mindspeed_mm_osp.checkpoint.layout import model_file, read_tracker

    it = read_tracker(save_dir)
    payload = torch.load(model_file(save_dir, it, 0), map_location="cpu", weights_only=False)
    return it, payload["model"], payload["ema_model"]


# ---- inference through the CLI ----

INFERENCE_SIZE = [9, 32, 48]  # 9 frames -> 2 latent frames; 32x48 -> 4x6 latents
INFERENCE_STEPS = 2


def make_tiny_inference(root: Path, **predictor) -> Path:
    """Tiny T5/CLIP/VAE folders, random predictor weights with the final block's text params (merged
    safetensors), two prompts and an inference JSON of `INFERENCE_SIZE` x `INFERENCE_STEPS`; `predictor`
    overrides keys of its predictor block (e.g. the image-to-video model_id)."""
    from safetensors.torch import save_file

    from mindspeed_mm_osp.config import from_dict
    from mindspeed_mm_osp.config.predictor import PredictorConfig
    from mindspeed_mm_osp.tools.make_tiny_models import make_tiny_models

    models = make_tiny_models(root / "models")
    data = json.loads((ROOT / "examples/tiny/inference.json").read_text())
    data["predictor"].update(predictor)
    torch.manual_seed(0)
    model = SparseUMMDiT(from_dict(PredictorConfig, {**data["predictor"], "final_block_text_params": True}))
    perturb_parameters(model)
    save_file(local_state_dict(model), str(root / "model_ema.safetensors"))
    data["ae"]["from_pretrained"] = str(models["vae"])
    for key, folder in [("text_encoder", "t5"), ("tokenizer", "t5"), ("text_encoder_2", "clip"),
                        ("tokenizer_2", "clip")]:
        data[key]["from_pretrained"] = str(models[folder])
    data["predictor"]["from_pretrained"] = str(root / "model_ema.safetensors")
    data["pipeline_config"]["input_size"] = INFERENCE_SIZE
    data["diffusion"]["num_inference_steps"] = INFERENCE_STEPS
    data.update(model_max_length=16, save_path=str(root / "default_out"))
    (root / "prompts.txt").write_text("a red fox runs in the snow\n\n  waves crash on a rocky shore  \n")
    data["prompt"] = str(root / "prompts.txt")
    (root / "inference.json").write_text(json.dumps(data))
    return root / "inference.json"


def tiny_assets_inference(assets, root: Path, steps: int = INFERENCE_STEPS) -> Path:
    """examples/tiny/inference.json on the `tiny_assets` models (no predictor weights: pass them), one prompt,
    `INFERENCE_SIZE` (2 latent frames of 4x6) and `steps` steps."""
    data = json.loads((ROOT / "examples/tiny/inference.json").read_text())
    models = assets["models"]
    data["ae"]["from_pretrained"] = str(models["vae"])
    for key, folder in [("text_encoder", "t5"), ("tokenizer", "t5"), ("text_encoder_2", "clip"),
                        ("tokenizer_2", "clip")]:
        data[key]["from_pretrained"] = str(models[folder])
    data["pipeline_config"]["input_size"] = INFERENCE_SIZE
    data["diffusion"]["num_inference_steps"] = steps
    data.update(model_max_length=16, prompt="a white square moving over a grey background")
    (root / "inference.json").write_text(json.dumps(data))
    return root / "inference.json"


def smooth_frames(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): moving colour gradients (what a tiny VAE reconstructs best)."""
    t, y, x = np.meshgrid(np.arange(frames), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    rgb = np.stack([0.5 + 0.4 * np.sin(3 * x + 0.2 * t), 0.3 + 0.5 * y, 0.6 - 0.3 * x * y], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def infer_on_rank(rank: int, world_size: int, argv: list[str]) -> None:
    """Rank body for `run_distributed`: the inference CLI with `argv`."""
    from mindspeed_mm_osp.inference import cli

    cli.main(argv)


def json_key_paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) of a JSON tree, for tests that mutate configs."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_key_paths(v, prefix + (i,))
    return out


def json_set(doc, path: tuple, value) -> None:
    """Replace the value at key path `path` of a JSON tree in place."""
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value
