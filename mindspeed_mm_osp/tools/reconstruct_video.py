"""VAE reconstruction check: encode -> decode real videos, report PSNR/SSIM, write side-by-sides.

    python -m mindspeed_mm_osp.tools.reconstruct_video --model-config MODEL_OR_INFERENCE_JSON \\
        --data DIR_OR_FILE --num-frames 33 --size 256 256 --out recon/ [--max-videos K]

Each video: the first N frames (N = 8k+1), centre-cropped to the target aspect and resized
(bicubic, antialiased, as training) to H x W, rounded to uint8 — that uint8 clip is "the
original" for both the metrics and the left half of the output. It is encoded to the posterior
*mean* (no sampling, so reruns agree bit for bit on the same machine), normalised and decoded
exactly as generation does (chunked when `ae.use_tiling`), and rounded to uint8. Metrics compare
those two uint8 clips before any mp4 compression (see `mindspeed_mm_osp.metrics`).

`--model-config` is a model JSON or an inference JSON (their `ae` block is used) or a bare `ae`
block; `ae.from_pretrained` must name the VAE weights. A directory is searched recursively for
video extensions (case-insensitive, `VIDEO_EXTENSIONS`); a file given directly is tried whatever
its extension. Files that cannot be read or are shorter than N frames are skipped and listed.
Output: `<out>/<relative path>` with `.mp4` as its extension (original | reconstruction, side by side, source
fps; `output_names`), a
table on stdout and `<out>/metrics.json` (infinite PSNR is written as the string "inf").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import platform
from ..checkpoint.safe_load import trust_pickle
from ..config import AEConfig, ConfigError, from_dict, read_json
from ..config.loader import check_path
from ..data.readers import ReadError, make_video_reader
from ..errors import UserError, check_input_path, check_output_dir, check_ranges, entry_point
from ..data.transforms import CenterCropResizeVideo, ToTensorVideo
from ..inference.presets import check_size
from ..inference.video_io import to_uint8_frames, write_json_atomic, write_mp4
from ..metrics import SSIM_DEFINITION, psnr, ssim_per_frame
from ..models.ae import VideoAutoencoder
from ..models.ae.wfvae import SPATIAL_FACTOR

# Containers FFmpeg demuxes as video; matched case-insensitively.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".flv", ".f4v", ".wmv", ".asf", ".mpg", ".mpeg",
    ".mpe", ".m2v", ".ts", ".mts", ".m2ts", ".vob", ".3gp", ".3g2", ".ogv", ".mxf", ".dv", ".y4m", ".nut",
    ".ivf", ".rm", ".rmvb", ".gif", ".h264", ".264", ".hevc", ".h265", ".265",
})
DEFAULT_FPS = 24.0


def load_ae_config(path: str | Path) -> AEConfig:
    """The `ae` block of a model or inference JSON (or a bare `ae` JSON), validated."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("ae"), dict):
        block, where = data["ae"], "ae"
    elif isinstance(data, dict) and "latent_dim" in data:
        block, where = data, ""
    else:
        raise ConfigError(path, "ae", "no `ae` block: pass a model JSON, an inference JSON or an `ae` JSON")
    config = from_dict(AEConfig, block, file=str(path), path=where)
    key = f"{where}.from_pretrained" if where else "from_pretrained"
    if not config.from_pretrained:
        raise ConfigError(path, key,
                          "must name the VAE checkpoint: reconstructing with random weights measures nothing")
    check_path(path, key, config.from_pretrained, "file")
    return config


def find_videos(data: str | Path) -> list[tuple[Path, Path]]:
    """(path, path relative to `data`'s folder) of every video under `data`, sorted."""
    root = Path(data)
    if root.is_file():
        return [(root, Path(root.name))]
    if not root.is_dir():
        raise UserError(f"--data {data}: no such file or directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in VIDEO_EXTENSIONS:
                found.append((path, path.relative_to(root)))
    return sorted(found, key=lambda p: p[1].as_posix())


def source_fps(path: Path) -> float:
    """Average frame rate of the first video stream (DEFAULT_FPS when the file does not say)."""
    import av

    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except (av.error.FFmpegError, IndexError):
        return DEFAULT_FPS
    return float(rate) if rate else DEFAULT_FPS


def prepare_clip(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (T, H0, W0, 3) -> uint8 (T, H, W, 3): centre crop to the aspect, bicubic resize, round."""
    x = ToTensorVideo()(torch.from_numpy(frames).permute(0, 3, 1, 2))
    x = CenterCropResizeVideo(size, interpolation_mode="bicubic")(x)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def reconstruct(vae: VideoAutoencoder, clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> its VAE reconstruction from the posterior mean, uint8 (T, H, W, 3)."""
    video = torch.from_numpy(clip).to(platform.device()).permute(3, 0, 1, 2)[None]
    video = video.to(torch.float32) / 127.5 - 1.0
    mean, _ = vae.encode_posterior(video)
    decoded = vae.decode(vae.normalize(mean))
    return to_uint8_frames(decoded[0])


@dataclass
class Result:
    path: str
    output: str
    psnr: float
    ssim: float
    ssim_per_frame: list[float]


def json_number(x: float) -> float | str:
    """JSON-safe number: infinite PSNR becomes "inf" (plain JSON has no Infinity)."""
    return "inf" if math.isinf(x) else round(x, 6)


def _fmt(x: float, digits: int) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def format_table(results: Sequence[Result], mean_psnr: float, mean_ssim: float) -> str:
    width = max([len("video"), len("mean")] + [len(r.path) for r in results])
    lines = [f"{'video':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>7}", "-" * (width + 20)]
    lines += [f"{r.path:<{width}}  {_fmt(r.psnr, 2):>9}  {_fmt(r.ssim, 4):>7}" for r in results]
    lines += ["-" * (width + 20), f"{'mean':<{width}}  {_fmt(mean_psnr, 2):>9}  {_fmt(mean_ssim, 4):>7}"]
    return "\n".join(lines)


def output_names(rels: Sequence[Path]) -> list[str]:
    """The side-by-side file of each video: its relative path, `/` as `__`, with `.mp4` in place of its extension
    (`sub/clip.MOV` -> `sub__clip.mp4`); a name an earlier video already took keeps its source extension before
    `.mp4` (`clip.mov` then `clip.mkv` -> `clip.mp4`, `clip_mkv.mp4`)."""
    names: list[str] = []
    for rel in rels:
        stem = rel.with_suffix("").as_posix().replace("/", "__")
        name = f"{stem}.mp4"
        if name.lower() in (n.lower() for n in names):
            name = f"{stem}_{rel.suffix[1:].lower()}.mp4"
        names.append(name)
    return names


def run(model_config: str, data: str, num_frames: int, size: tuple[int, int], out: str | Path,
        max_videos: Optional[int] = None, ssim_channels: str = "y") -> dict:
    """Reconstruct every video, write the side-by-sides and `metrics.json`; returns the report dict."""
    check_size(num_frames, *size, multiple=SPATIAL_FACTOR)
    config = load_ae_config(model_config)
    videos = find_videos(data)[:max_videos]
    if not videos:
        raise UserError(f"--data {data}: no videos found (extensions: {' '.join(sorted(VIDEO_EXTENSIONS))})")
    out = Path(out)
    vae = VideoAutoencoder(config).to(platform.device())
    reader = make_video_reader("pyav")
    results: list[Result] = []
    skipped: list[dict] = []
    names = dict(zip((rel for _, rel in videos), output_names([rel for _, rel in videos])))
    for path, rel in tqdm(videos, desc="reconstruct", unit="video", file=sys.stderr):
        try:
            frames = reader.read(str(path), np.arange(num_frames))
        except ReadError as e:
            skipped.append({"path": rel.as_posix(), "reason": str(e)})
            continue
        clip = prepare_clip(frames, size)
        recon = reconstruct(vae, clip)
        target = out / names[rel]
        write_mp4(target, np.concatenate([clip, recon], axis=2), source_fps(path))
        per_frame = ssim_per_frame(clip, recon, ssim_channels)
        results.append(Result(rel.as_posix(), target.name, psnr(clip, recon), float(per_frame.mean()),
                              per_frame.tolist()))
    if not results:
        raise UserError(f"--data {data}: none of the {len(skipped)} videos could be read (first: "
                        f"{skipped[0]['path']}: {skipped[0]['reason']}); nothing to measure")
    mean_psnr = float(np.mean([r.psnr for r in results]))
    mean_ssim = float(np.mean([r.ssim for r in results]))
    report = {
        "model_config": str(model_config),
        "vae_weights": config.from_pretrained,
        "num_frames": num_frames,
        "size": list(size),
        "encode": "posterior mean (no sampling)",
        "psnr": "over all pixels and channels of the clip, uint8 range, peak 255",
        "ssim": SSIM_DEFINITION,
        "ssim_channels": ssim_channels,
        "videos": [{"path": r.path, "output": r.output, "psnr": json_number(r.psnr), "ssim": round(r.ssim, 6),
                    "ssim_per_frame": [round(s, 6) for s in r.ssim_per_frame]} for r in results],
        "mean": {"psnr": json_number(mean_psnr), "ssim": round(mean_ssim, 6), "num_videos": len(results)},
        "skipped": skipped,
    }
    json.dumps(report, allow_nan=False)  # fail here, not in a reader, if a NaN slipped in
    write_json_atomic(out / "metrics.json", report)
    print(format_table(results, mean_psnr, mean_ssim))
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mindspeed_mm_osp.tools.reconstruct_video",
                                description="Encode/decode videos with the WF-VAE; report PSNR/SSIM; "
                                            "write original|reconstruction mp4s.")
    p.add_argument("--model-config", required=True, help="model JSON, inference JSON or `ae` JSON")
    p.add_argument("--data", required=True, help="a video file or a folder (searched recursively)")
    p.add_argument("--num-frames", type=int, required=True, help="first N frames of each video, N = 8k+1")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="multiples of 8")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("--max-videos", type=int, default=None, help="only the first K videos (sorted by path)")
    p.add_argument("--ssim-channels", choices=("y", "rgb"), default="y",
                   help="SSIM on BT.601 luma (default) or averaged over R, G, B")
    p.add_argument("--trust-pickle", action="append", default=[], metavar="FILE",
                   help="unpickle this one file (the VAE weights) in full although it needs Python globals outside "
                        "the allow-list (it can run code; docs/security.md); repeatable")
    return p


# The valid range of every numeric flag (`errors.check_ranges`).
RANGES = {"--num-frames": dict(low=1, high=100000), "--max-videos": dict(low=1)}


@entry_point("reconstruct_video")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check the flags and paths at the edge, then `run`; errors per `errors.entry_point`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_ranges({"--num-frames": args.num_frames, "--max-videos": args.max_videos}, RANGES)
    try:
        check_size(args.num_frames, *args.size, multiple=SPATIAL_FACTOR)
    except ValueError as e:
        raise UserError(f"--num-frames/--size: {e}") from e
    check_input_path("--data", args.data)
    check_output_dir("--out", args.out, overwrite=args.overwrite,
                     taken=lambda p: p.name == "metrics.json" or p.suffix == ".mp4")
    trust_pickle(args.trust_pickle)
    run(args.model_config, args.data, args.num_frames, tuple(args.size), args.out, args.max_videos,
        args.ssim_channels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
