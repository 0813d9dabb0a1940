"""Size presets map to sizes the VAE and predictor accept; bad input names the nearest valid size."""

import argparse

import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.inference.presets import (
    ASPECT_RATIOS, RESOLUTIONS, add_preset_arguments, check_size, nearest_valid_size, resolve_size, size_from_args,
)
from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict


def valid(frames: int, height: int, width: int) -> bool:
    return frames >= 1 and (frames - 1) % 8 == 0 and height % 16 == 0 and width % 16 == 0 and height > 0 < width


@pytest.mark.parametrize("resolution", list(RESOLUTIONS))
@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_every_preset_is_valid(resolution, aspect_ratio):
    f, h, w = resolve_size(resolution, aspect_ratio, duration=5, fps=24)
    assert valid(f, h, w)
    assert f == 121
    assert min(h, w) == nearest_valid_size(1, RESOLUTIONS[resolution], 16)[1]  # "p" is the short side
    rh, rw = ASPECT_RATIOS[aspect_ratio]
    assert abs(h / w - rh / rw) / (rh / rw) < 0.03  # ratio kept up to the 16-pixel grid
    assert (h <= w) == (rh <= rw)


@pytest.mark.parametrize("resolution, aspect_ratio, size", [
    ("576p", "16:9", (576, 1024)), ("576p", "9:16", (1024, 576)), ("720p", "16:9", (720, 1280)),
    ("480p", "4:3", (480, 640)), ("360p", "16:9", (368, 640)), ("240p", "16:9", (240, 432)),
    ("144p", "1:1", (144, 144)), ("1080p", "16:9", (1088, 1920)), ("288p", "3:4", (384, 288)),
])
def test_known_sizes(resolution, aspect_ratio, size):
    assert resolve_size(resolution, aspect_ratio, frames=121) == (121, *size)


@pytest.mark.parametrize("seconds, fps, frames", [(5, 24, 121), (4, 24, 97), (1 / 24, 24, 1), (2, 30, 57),
                                                 (0.5, 24, 9), (3.2, 30, 97)])
def test_duration_snaps_to_8k_plus_1(seconds, fps, frames):
    assert resolve_size("480p", "16:9", duration=seconds, fps=fps)[0] == frames


def test_invalid_inputs_name_the_nearest_valid_size():
    with pytest.raises(ValueError, match=r"nearest valid: 121 frames"):
        resolve_size("576p", "16:9", frames=120)
    with pytest.raises(ValueError, match=r"--resolution 480p --aspect-ratio 16:9 = 121x480x848"):
        resolve_size("500p", "16:9", frames=121)
    with pytest.raises(ValueError, match=r"--resolution 720p --aspect-ratio 16:9 = 9x720x1280"):
        resolve_size("720p", "2:1", frames=9)
    with pytest.raises(ValueError, match=r"--resolution 720p --aspect-ratio 9:16 = 9x1280x720"):
        resolve_size("720", "10:17", frames=9)  # "720" without "p" is not a preset name
    with pytest.raises(ValueError, match="not both"):
        resolve_size("720p", "16:9", duration=5, frames=121)
    with pytest.raises(ValueError, match=r"nearest valid size: 121x576x1024"):
        check_size(120, 570, 1030)


def test_nearest_valid_size():
    assert nearest_valid_size(120, 1080, 1920) == (121, 1088, 1920)
    assert nearest_valid_size(0, 3, 7) == (1, 16, 16)
    assert nearest_valid_size(5, 24, 40) == (9, 32, 48)  # ties go up
    assert nearest_valid_size(4, 20, 20, multiple=8) == (1, 24, 24)
    assert check_size(121, 576, 1024) == (121, 576, 1024)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_preset_arguments(parser)
    return parser.parse_args(argv)


def test_cli_wiring():
    default = (121, 576, 1024)
    assert size_from_args(parse([]), default) == default
    assert size_from_args(parse(["--resolution", "720p", "--aspect-ratio", "9:16", "--duration", "2s"]),
                          default, fps=24) == (49, 1280, 720)
    assert size_from_args(parse(["--resolution", "480p"]), default) == (121, 480, 848)  # keeps 16:9
    assert size_from_args(parse(["--aspect-ratio", "9:16"]), default) == (121, 1024, 576)  # keeps 576p
    assert size_from_args(parse(["--duration", "33f"]), default) == (33, 576, 1024)
    assert size_from_args(parse(["--duration", "1.5"]), default, fps=16) == (25, 576, 1024)
    with pytest.raises(ValueError, match="nearest valid: 33 frames"):
        size_from_args(parse(["--duration", "32f"]), default)
    with pytest.raises(SystemExit):
        parse(["--duration", "five"])


def test_tiny_vae_runs_at_smallest_preset():
    """144p 1:1, one frame (the 9-frame time path runs in test_reconstruct_video)."""
    frames, height, width = resolve_size("144p", "1:1", duration=1 / 24, fps=24)
    assert (frames, height, width) == (1, 144, 144)
    vae = VideoAutoencoder(from_dict(AEConfig, tiny_ae_config_dict(), path="ae"))
    video = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = vae.encode_posterior(video)
    assert mean.shape == (1, *vae.latent_shape(frames, height, width))
    out = vae.decode(vae.normalize(mean))
    assert out.shape == video.shape and torch.isfinite(out).all()
