"""reconstruct_video end to end on a synthetic clip and a tiny random WF-VAE checkpoint.

The reported PSNR/SSIM are checked against a numpy reference (explicit window sums, no
scipy) computed on the same uint8 frames: the first N source frames and their VAE
reconstruction from the posterior mean.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, ConfigError, from_dict, read_json
from mindspeed_mm_osp.inference.video_io import read_mp4, to_uint8_frames
from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict, write_tiny_wfvae
from mindspeed_mm_osp.tools import reconstruct_video as rv
from mindspeed_mm_osp.tools.make_synthetic_dataset import decode_frame_index, write_video
from helpers import psnr_reference, ssim_reference

ROOT = Path(__file__).resolve().parents[2]
H, W, N = 32, 48, 9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    ckpt = write_tiny_wfvae(root / "vae")
    ae = {**tiny_ae_config_dict(), "from_pretrained": str(ckpt)}
    (root / "model.json").write_text(json.dumps({"frames": N, "ae": ae, "predictor": {}}))
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    write_video(data / "clip.MP4", 12, H, W, fps=30)  # 12 frames: the tool must take the first 9
    write_video(data / "sub" / "short.MoV", 5, H, W)  # too short: skipped, listed
    (data / "notes.txt").write_text("not a video")
    return root, data, ae


def test_reconstruction_metrics_match_numpy(setup, capsys):
    root, data, ae = setup
    out = root / "out"
    assert rv.main(["--model-config", str(root / "model.json"), "--data", str(data), "--num-frames", str(N),
                    "--size", str(H), str(W), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [v["path"] for v in report["videos"]] == ["clip.MP4"]
    assert [s["path"] for s in report["skipped"]] == ["sub/short.MoV"]
    entry = report["videos"][0]
    assert entry["output"] == "clip.mp4" and sorted(p.name for p in out.iterdir()) == ["clip.mp4", "metrics.json"]

    # Reference: same frames (source size == target size, so no resize), posterior-mean reconstruction.
    original = read_mp4(data / "clip.MP4")[0][:N]
    vae = VideoAutoencoder(from_dict(AEConfig, ae, path="ae"))
    video = torch.from_numpy(original).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    mean, _ = vae.encode_posterior(video)
    recon = to_uint8_frames(vae.decode(vae.normalize(mean))[0])
    ref_psnr, ref_ssim = psnr_reference(original, recon), ssim_reference(original, recon)
    assert math.isfinite(ref_psnr) and 0 < ref_ssim < 1
    assert entry["psnr"] == pytest.approx(ref_psnr, abs=1e-5)
    assert entry["ssim"] == pytest.approx(ref_ssim, abs=1e-5)
    assert len(entry["ssim_per_frame"]) == N
    assert report["mean"] == {"psnr": entry["psnr"], "ssim": entry["ssim"], "num_videos": 1}

    table = capsys.readouterr().out
    assert "clip.MP4" in table and f"{ref_psnr:.2f}" in table and f"{ref_ssim:.4f}" in table

    # Side by side: original | reconstruction, first N frames, source fps.
    frames, fps = read_mp4(out / entry["output"])
    assert frames.shape == (N, H, 2 * W, 3) and fps == pytest.approx(30)
    assert [decode_frame_index(f[:, :W]) for f in frames] == list(range(N))
    right = frames[:, :, W:].astype(int)  # the reconstruction after lossy H.264 (yuv420p)
    assert np.abs(right - recon).mean() < np.abs(right - original).mean()


def test_infinite_psnr_is_reported_cleanly():
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    result = rv.Result("same.mp4", "same.mp4", rv.psnr(frames, frames), rv.ssim_per_frame(frames, frames)[0], [1.0])
    assert result.psnr == math.inf and result.ssim == 1.0
    assert json.loads(json.dumps({"psnr": rv.json_number(result.psnr)}, allow_nan=False)) == {"psnr": "inf"}
    table = rv.format_table([result], result.psnr, result.ssim)
    assert table.splitlines()[2].split()[1:] == ["inf", "1.0000"]


def test_model_inference_and_bare_ae_json(setup, tmp_path):
    root, _, ae = setup
    expected = rv.load_ae_config(root / "model.json")
    inference = read_json(ROOT / "examples/opensoraplan1.5/inference_t2v_model1_5.json")  # has // comments
    inference["ae"] = ae
    (tmp_path / "inference.json").write_text(json.dumps(inference))
    (tmp_path / "ae.json").write_text(json.dumps(ae))
    assert rv.load_ae_config(tmp_path / "inference.json") == expected
    assert rv.load_ae_config(tmp_path / "ae.json") == expected
    (tmp_path / "random.json").write_text(json.dumps({"ae": {**ae, "from_pretrained": None}}))
    with pytest.raises(ConfigError, match="ae.from_pretrained"):
        rv.load_ae_config(tmp_path / "random.json")


def test_find_videos_is_case_insensitive(tmp_path):
    for name in ["b.MP4", "a.mov", "c.WebM", "sub/d.mkv", "notes.txt", ".hidden.mp4", "cover.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [rel.as_posix() for _, rel in rv.find_videos(tmp_path)] == ["a.mov", "b.MP4", "c.WebM", "sub/d.mkv"]
    assert [rel.as_posix() for _, rel in rv.find_videos(tmp_path / "notes.txt")] == ["notes.txt"]


def test_invalid_size_names_nearest(setup, capsys):
    root, data, _ = setup
    with pytest.raises(SystemExit):
        rv.main(["--model-config", str(root / "model.json"), "--data", str(data), "--num-frames", "10",
                 "--size", "30", "48", "--out", str(root / "bad")])
    assert "nearest valid size: 9x32x48" in capsys.readouterr().err


def test_output_names_replace_the_extension_and_stay_distinct():
    rels = [Path(p) for p in ["clip.MP4", "sub/take.mkv", "a.mov", "a.MKV", "sub/a.webm"]]
    assert rv.output_names(rels) == ["clip.mp4", "sub__take.mp4", "a.mp4", "a_mkv.mp4", "sub__a.mp4"]
