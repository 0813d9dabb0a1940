"""Video editing with a strength (`--video PATH --strength S`) on tiny models: the start step, strength 1 is
text-to-video, strength 0 is the clip's VAE round trip, the noised start, the step cache from a later step, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm_osp.config import load_inference_config
from mindspeed_mm_osp.data.transforms import CenterCropResizeVideo, Compose, ToTensorVideo, ae_norm
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler
from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.arguments import parse_args
from mindspeed_mm_osp.inference.editing import start_step
from mindspeed_mm_osp.inference.pipeline import initial_noise, load_latents
from mindspeed_mm_osp.inference.ranks import release_parallel
from mindspeed_mm_osp.inference.runner import InferenceRunner
from mindspeed_mm_osp.inference.video_io import read_mp4, to_uint8_frames, write_mp4
from mindspeed_mm_osp.metrics import psnr
from mindspeed_mm_osp.models.ae import VideoAutoencoder
from helpers import INFERENCE_SIZE, make_tiny_inference, smooth_frames

SIZE = INFERENCE_SIZE  # 9 x 32 x 48 -> 2 latent frames of 4 x 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video_editing")
    make_tiny_inference(root)
    write_mp4(root / "clip.mp4", smooth_frames(12, 40, 64), 24)  # longer and larger than the output
    return root


def argv(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(setup / "inference.json"), "--prompt", "a red fox", "--save-path", str(out), *extra]


def edit(setup: Path, strength: str) -> list[str]:
    return ["--video", str(setup / "clip.mp4"), "--strength", strength]


def clip_latents(setup: Path) -> tuple[torch.Tensor, torch.Tensor, VideoAutoencoder]:
    """The clip's first frames at the output size (3, T, H, W), read and transformed here, and their normalised
    posterior mean (1, C, t, h, w)."""
    frames, _ = read_mp4(setup / "clip.mp4")
    transform = Compose([ToTensorVideo(), CenterCropResizeVideo(tuple(SIZE[1:]), interpolation_mode="bicubic"), ae_norm])
    pixels = transform(torch.from_numpy(frames[:SIZE[0]]).permute(0, 3, 1, 2)).permute(1, 0, 2, 3)
    vae = VideoAutoencoder(load_inference_config(setup / "inference.json").ae)
    return pixels, vae.normalize(vae.encode_posterior(pixels[None])[0]).float(), vae


@pytest.mark.parametrize("steps, strength, skipped", [
    (4, 1.0, 0), (4, 0.0, 4), (4, 0.5, 2), (4, 0.3, 3), (4, 0.9, 0), (4, 0.375, 3), (10, 0.25, 8), (1, 0.5, 1),
    (50, 0.8, 10),
])
def test_start_step_rounds_the_skipped_steps_half_up(steps, strength, skipped):
    assert start_step(steps, strength) == skipped


def test_strength_one_is_text_to_video_from_the_same_noise(setup, tmp_path):
    cli.main(argv(setup, tmp_path / "t2v", "--save-latents"))
    cli.main(argv(setup, tmp_path / "edit", "--save-latents", *edit(setup, "1")))
    t2v, edited = (load_latents(tmp_path / name / "000000.safetensors") for name in ("t2v", "edit"))
    assert torch.equal(edited.latents, t2v.latents)
    assert edited.record["edit"] == {"video": str(setup / "clip.mp4"), "strength": 1.0, "start_step": 0,
                                     "steps_run": 2, "start_sigma": 1.0}


def test_strength_zero_is_the_vae_round_trip(setup, tmp_path, capsys):
    pixels, latents, vae = clip_latents(setup)
    cli.main(argv(setup, tmp_path / "lat", "--save-latents", *edit(setup, "0")))
    assert torch.equal(load_latents(tmp_path / "lat" / "000000.safetensors").latents, latents[0])

    cli.main(argv(setup, tmp_path / "vid", *edit(setup, "0")))
    assert "at strength 0 (0 of 2 steps): PSNR output vs input" in capsys.readouterr().out
    with torch.no_grad():
        round_trip = vae.decode(latents).float().clamp(-1, 1)[0]
    target = to_uint8_frames(pixels)
    vae_psnr = psnr(to_uint8_frames(round_trip), target)
    record = json.loads((tmp_path / "vid" / "000000.json").read_text())["edit"]
    assert record["psnr_output_db"] == pytest.approx(vae_psnr, abs=1e-6)
    assert record["psnr_vae_round_trip_db"] == pytest.approx(vae_psnr, abs=1e-6)
    frames, _ = read_mp4(tmp_path / "vid" / "000000.mp4")
    mp4_psnr = psnr(frames, target)  # H.264 smooths the random-weight VAE's lattice a little
    assert frames.shape == (*SIZE, 3) and mp4_psnr >= vae_psnr - 0.5, (mp4_psnr, vae_psnr)
    print(f"strength 0 vs the input clip: VAE round trip {vae_psnr:.2f} dB, the mp4 {mp4_psnr:.2f} dB")


def test_sampling_starts_from_the_noised_clip_at_the_start_sigma(setup, tmp_path):
    """Strength 0.5 of 4 steps: the first two steps are skipped and the sampler starts from
    (1 - sigma_2) * z + sigma_2 * noise, with the text-to-video noise of the prompt."""
    runner = InferenceRunner(parse_args(argv(setup, tmp_path, "--num-inference-steps", "4", *edit(setup, "0.5"))))
    runner.setup()
    try:
        runner.build(decode=False)
        batch = runner.encode_prompt([0], ["a red fox"])
        runner.prepare_condition(batch)
    finally:
        release_parallel(runner.state.owned)
    cfg = runner.state.cfg
    sigma = FlowMatchingScheduler(cfg.diffusion).sampling_sigmas(latent_hw=tuple(s // 8 for s in SIZE[1:]))[2]
    assert sigma.item() == pytest.approx(7 * 0.5 / (1 + 6 * 0.5))  # shift 7: sigma_2 = 0.875
    noise = initial_noise(batch.noise.shape[1:], cfg.seed, [0])
    assert torch.equal(batch.noise, noise)
    torch.testing.assert_close(batch.start, (1 - sigma) * clip_latents(setup)[1] + sigma * noise, rtol=0, atol=1e-6)
    assert runner.state.edit.sigmas.numel() == 3  # sigma_2, sigma_3, sigma_4: two steps run


def test_the_step_cache_counts_schedule_steps_from_the_start(setup, tmp_path):
    """8 steps at strength 0.5 run steps 4..7: with a threshold no change reaches, the cache computes the first
    (4) and the last (7) and skips 5 and 6; at threshold 0 it equals the plain forward bit for bit."""
    runs = {}
    for name, extra in (("plain", ()), ("zero", ("--cache-threshold", "0")), ("high", ("--cache-threshold", "1e9"))):
        runner = InferenceRunner(parse_args(argv(setup, tmp_path / name, "--save-latents", "--num-inference-steps",
                                                 "8", *extra, *edit(setup, "0.5"))))
        runner.run()
        runs[name] = (load_latents(tmp_path / name / "000000.safetensors").latents, runner.state.step_cache)
    assert torch.equal(runs["zero"][0], runs["plain"][0]) and runs["zero"][1].skipped == []
    cache = runs["high"][1]
    assert (cache.skipped, cache.steps_run, cache.skipped_fraction) == ([5, 6], 4, 0.5)
    assert not torch.equal(runs["high"][0], runs["plain"][0])


@pytest.mark.parametrize("extra, named", [
    (["--strength", "1.5", "--video", "CLIP"], "--strength"),
    (["--strength", "0.5"], "--strength S needs --video PATH"),
    (["--video", "CLIP"], "--video needs --condition-frames K (continue the clip) or --strength S (edit it)"),
    (["--video", "MISSING", "--strength", "0.5"], "missing.mp4"),
    (["--video", "GARBAGE", "--strength", "0.5"], "--video"),
    (["--video", "CLIP", "--strength", "0.5", "--size", "17", "32", "48"], "cannot read its first 17 frames"),
    (["--video", "CLIP", "--strength", "0.5", "--condition-frames", "3"], "cannot be combined"),
    (["--video", "CLIP", "--strength", "0.5", "--image", "CLIP"], "--image"),
])
def test_bad_edit_requests_are_one_line_and_exit_2(setup, tmp_path, capsys, extra, named):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    paths = {"CLIP": str(setup / "clip.mp4"), "MISSING": str(tmp_path / "missing.mp4"),
             "GARBAGE": str(tmp_path / "garbage.mp4")}
    with pytest.raises(SystemExit) as exc:
        cli.main(argv(setup, tmp_path / "out", *[paths.get(a, a) for a in extra]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert named in err.strip().splitlines()[-1], err  # argparse prints its usage line above
    assert not (tmp_path / "out").exists()
