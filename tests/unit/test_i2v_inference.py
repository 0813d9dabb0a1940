"""Image-to-video sampling on tiny models: --image / --last-image / --video --condition-frames k, given frames equal
their VAE round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mindspeed_mm_osp.config import load_inference_config
from mindspeed_mm_osp.diffusion import sample
from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.conditioning import ConditionRequest, InpaintCondition, condition_pixels
from mindspeed_mm_osp.inference.video_io import read_mp4, to_uint8_frames, write_mp4
from mindspeed_mm_osp.metrics import psnr
from mindspeed_mm_osp.models.ae import VideoAutoencoder
from helpers import make_tiny_inference, smooth_frames

SIZE = [17, 32, 48]  # 3 latent frames of 4x6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_inference")
    config = make_tiny_inference(root, model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8)
    data = json.loads(config.read_text())  # random weights everywhere, condition channels included
    data["pipeline_config"]["input_size"] = SIZE
    data["prompt"] = "a slow colour sweep"
    (root / "i2v.json").write_text(json.dumps(data))
    frames = smooth_frames(20, 40, 64)  # not the output size: resized and cropped like training samples
    Image.fromarray(frames[0]).save(root / "first.png")
    Image.fromarray(frames[-1]).save(root / "last.png")
    write_mp4(root / "clip.mp4", frames, 24)
    return root


def run(setup: Path, out: Path, *extra: str) -> dict:
    cli.main(["--config", str(setup / "i2v.json"), "--save-path", str(out), *extra])
    return json.loads((out / "000000.json").read_text())


def test_image_to_video_first_frame_is_the_vae_round_trip(setup, tmp_path, capsys):
    record = run(setup, tmp_path, "--image", str(setup / "first.png"))
    assert "condition frames [0]: PSNR output vs input" in capsys.readouterr().out
    cfg = load_inference_config(setup / "i2v.json")
    pixels, mask = condition_pixels(ConditionRequest(image=str(setup / "first.png")), *SIZE)
    vae = VideoAutoencoder(cfg.ae)
    with torch.no_grad():  # the image alone through the VAE
        round_trip = vae.decode(vae.normalize(vae.encode_posterior(pixels[None, :, :1])[0])).clamp(-1, 1)[0]
    target = to_uint8_frames(pixels[:, :1])
    vae_psnr = psnr(to_uint8_frames(round_trip), target)
    frames, _ = read_mp4(tmp_path / "000000.mp4")
    assert frames.shape == (17, 32, 48, 3)
    out_psnr = psnr(frames[:1], target)  # after H.264
    assert out_psnr >= vae_psnr - 0.5, (out_psnr, vae_psnr)
    cond = record["condition"]
    assert cond["condition_frames"] == [0] and cond["reimpose"] is True
    assert cond["psnr_output_db"] == pytest.approx(vae_psnr, abs=1e-6)  # causal VAE: frame 0 decodes alone
    print(f"i2v first frame: output {out_psnr:.2f} dB (mp4), VAE round trip {vae_psnr:.2f} dB")


def test_transition_and_continuation(setup, tmp_path):
    both = run(setup, tmp_path / "t", "--image", str(setup / "first.png"), "--last-image", str(setup / "last.png"))
    assert both["condition"]["condition_frames"] == [0, 16]
    cont = run(setup, tmp_path / "c", "--video", str(setup / "clip.mp4"), "--condition-frames", "9")
    cond = cont["condition"]
    assert cond["condition_frames"] == list(range(9))  # latent frames 0 and 1: reimposed, exact round trip
    assert cond["psnr_output_db"] >= cond["psnr_vae_round_trip_db"] - 0.5
    free = run(setup, tmp_path / "f", "--video", str(setup / "clip.mp4"), "--condition-frames", "9",
               "--no-reimpose-condition")["condition"]
    assert free["reimpose"] is False and free["psnr_output_db"] < cond["psnr_output_db"]


def test_reimposed_latent_frames_end_at_the_condition():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    frame_mask = torch.ones(17)
    frame_mask[:9] = 0
    from mindspeed_mm_osp.models.predictor import compress_mask, given_latent_frames

    mask = compress_mask(frame_mask[None], 8, 2, 2).expand(2, -1, -1, -1, -1)
    cond = InpaintCondition(latents, mask, given_latent_frames(mask), noise, reimpose=True)
    seen = []

    def model_fn(x, timestep):
        seen.append(x.shape[1])
        return torch.randn(x.shape[0], 4, *x.shape[2:], generator=g)

    out = sample(lambda x, t: model_fn(cond.model_input(x), t), noise.clone(), {},
                 sigmas=torch.linspace(1, 0, 5), constrain=cond.constrain)
    assert seen == [4 + 4 + 8] * 4
    assert torch.equal(out[:, :, :2], latents[:, :, :2]) and not torch.allclose(out[:, :, 2], latents[:, :, 2])


def test_condition_flags_need_the_inpaint_model_and_each_other(setup, tmp_path, capsys):
    data = json.loads((setup / "i2v.json").read_text())
    data["predictor"]["model_id"] = "SparseUMMDiT"
    (tmp_path / "t2v.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(tmp_path / "t2v.json"), "--image", str(setup / "first.png")])
    assert exc.value.code == 2 and "SparseUMMDiTInpaint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--config", str(setup / "i2v.json"), "--video", str(setup / "clip.mp4")])
    assert "--video needs --condition-frames K (continue the clip) or --strength S" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # unreadable inputs and impossible lengths: a message, no traceback
        cli.main(["--config", str(setup / "i2v.json"), "--image", str(tmp_path / "missing.png")])
    assert exc.value.code == 2 and "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--config", str(setup / "i2v.json"), "--video", str(setup / "clip.mp4"), "--condition-frames", "18"])
    assert "--condition-frames: must be in [1, 17]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the clip has 20 frames
        cli.main(["--config", str(setup / "i2v.json"), "--size", "33", "32", "48", "--video", str(setup / "clip.mp4"),
                  "--condition-frames", "25"])
    assert "clip.mp4" in capsys.readouterr().err

