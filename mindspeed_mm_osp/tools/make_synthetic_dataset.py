"""Write a small synthetic text-to-video dataset in a few seconds (docs/data.md, "The synthetic dataset").

    python -m mindspeed_mm_osp.tools.make_synthetic_dataset OUT [--num-videos N --num-images M --seed S]

OUT gets `set1/` (video edge cases V1–V21, incl. a corrupt, a zero-byte and a
missing file), `set2/` (image cases I1–I7 and records without caption/resolution),
`set3/` (N random videos and M random images that all pass the filter), one
`anno.json` per set (each record carries an `id` naming its case), `data.txt` (with a
blank line), `data.json` (17 frames, 64×128, force_resolution) and `clips.txt` (set3's
random videos alone, annotated in `set3/clips.json`). For your own videos use
`tools.prepare_dataset`; the annotation format and the data.txt line are in docs/data.md, "Your own videos".

Frame k of every clip encodes k: the background has grey level `8 + 6·(k mod 40)` and the
top-left quadrant `8 + 6·(k div 40)`; a green square, a quarter of the short side, moves in the bottom-right
quadrant (large and coloured so that it stays visible through the tiny demo VAE at any background level).
`decode_frame_index` recovers k from a decoded (or resized) frame.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.dataset import BROKEN_ON_PURPOSE
from ..errors import check_output_dir, check_ranges, entry_point

RED_BAND = 16
SQUARE_RGB = (40, 220, 60)  # green: never mistaken for the red crop bands (R < G)


def frame_pixels(k: int, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] content of frame k (see module docstring)."""
    img = np.full((height, width, 3), 8 + 6 * (k % 40), np.uint8)
    img[: height // 2, : width // 2] = 8 + 6 * (k // 40)
    side = max(2, min(height, width) // 4)
    y = height // 2 + (k * 3) % max(1, height // 2 - side)
    x = width // 2 + (k * 5) % max(1, width // 2 - side)
    img[y:y + side, x:x + side] = SQUARE_RGB
    return img


def decode_frame_index(frame: np.ndarray) -> int:
    """k from an [H, W, 3] (or [3, H, W] float in [-1, 1]) frame made by `frame_pixels`."""
    f = np.asarray(frame, dtype=np.float64)
    if f.shape[0] == 3 and f.shape[-1] != 3:
        f = (np.moveaxis(f, 0, -1) + 1.0) * 127.5
    h, w = f.shape[:2]
    hi = f[h // 8: h * 3 // 8, w // 8: w * 3 // 8].mean()
    lo = f[h * 5 // 8: h * 7 // 8, w // 8: w * 3 // 8].mean()
    return 40 * int(round((hi - 8) / 6)) + int(round((lo - 8) / 6))


def write_video(path: str | Path, num_frames: int, height: int, width: int, fps: float = 24.0,
                red_bands: int = 0, gop: int = 8) -> Path:
    """Lossless-ish (libx264 qp 0, yuv420p) mp4 of `frame_pixels` frames.

    `red_bands` > 0 adds pure-red rows above and below the content (for `crop` tests); the
    file is then `height + 2·red_bands` tall.
    """
    import av

    path = Path(path)
    rate = Fraction(24000, 1001) if abs(fps - 23.976) < 1e-3 else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height + 2 * red_bands
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        stream.codec_context.gop_size = gop
        for k in range(num_frames):
            img = frame_pixels(k, height, width)
            if red_bands:
                band = np.zeros((red_bands, width, 3), np.uint8)
                band[..., 0] = 255
                img = np.concatenate([band, img, band])
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_image(path: str | Path, height: int, width: int, mode: str = "RGB", level: int = 128) -> Path:
    """Solid grey image with a 4-pixel blue border, saved in the format of its extension."""
    arr = np.full((height, width, 3), level, np.uint8)
    arr[:4], arr[-4:], arr[:, :4], arr[:, -4:] = (0, 0, 255), (0, 0, 255), (0, 0, 255), (0, 0, 255)
    im = Image.fromarray(arr).convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[Path(path).suffix.lower()]
    im.save(path, format=fmt)
    return Path(path)


# (id, file, (h, w, fps, frames on disk) or None, annotation overrides)
_VIDEOS = [
    ("V1", "v24_40.mp4", (128, 256, 24, 40), {}),
    ("V2", "v30_40.mp4", (128, 256, 30, 40), {"fps": 30}),
    ("V3", "v60_30.mp4", (128, 256, 60, 30), {"fps": 60}),
    ("V4", "v12_40.mp4", (128, 256, 12, 40), {"fps": 12}),
    ("V5", "v23976_20.mp4", (128, 256, 23.976, 20), {"fps": 23.976}),
    ("V6", "v24_17.mp4", (128, 256, 24, 17), {}),
    ("V7", "v24_12.mp4", (128, 256, 24, 12), {}),
    ("V8", "v24_8.mp4", (128, 256, 24, 8), {}),
    ("V9", "v24_100.mp4", (128, 256, 24, 100), {}),
    ("V10", "v24_60.mp4", (128, 256, 24, 60), {"cut": [30, 60], "num_frames": 30}),
    ("V11", "v24_crop.mp4", (128, 256, 24, 40), {"crop": [0, 256, RED_BAND, RED_BAND + 128]}),
    ("V12", "v_portrait.mp4", (256, 128, 24, 20), {}),
    ("V13", "v_wide.mp4", (64, 256, 24, 20), {}),
    ("V14", "v_small.mp4", (48, 96, 24, 20), {}),
    ("V15", "v_43_ok.mp4", (96, 128, 24, 20), {}),
    ("V16", "v_43_small.mp4", (90, 120, 24, 20), {}),
    ("V17", "v_square.mp4", (128, 128, 24, 20), {}),
    ("V18", "corrupt.mp4", None, {"resolution": {"height": 128, "width": 256}, "num_frames": 40}),
    ("V19", "missing.mp4", None, {"resolution": {"height": 128, "width": 256}, "num_frames": 40}),
    ("V20", "v24_10.mp4", (128, 256, 24, 10), {"num_frames": 40}),
    ("V21", "empty.mp4", None, {"resolution": {"height": 128, "width": 256}, "num_frames": 40}),
    ("D1", "v24_12.mp4", None, {"resolution": {"height": 128, "width": 256}, "num_frames": 12}),
    ("D1", "v24_12.mp4", None, {"resolution": {"height": 128, "width": 256}, "num_frames": 12}),
]

_IMAGES = [
    ("I1", "i_ok.jpg", (128, 256, "RGB")), ("I2", "i_43.jpg", (96, 128, "RGB")),
    ("I3", "i_small.jpg", (32, 64, "RGB")), ("I4", "i_portrait.jpg", (200, 100, "RGB")),
    ("I5", "i_png.png", (128, 256, "RGBA")), ("I6", "i_upper.JPG", (128, 256, "RGB")),
    ("I7", "i_gray.jpg", (128, 256, "L")),
]

CONFIG_A = {
    "video_reader_type": "decoder", "image_reader_type": "Image", "num_frames": 17, "frame_interval": 1,
    "max_height": 64, "max_width": 128, "max_hxw": 8192, "min_hxw": 8192, "force_resolution": True,
    "force_5_ratio": False, "max_h_div_w_ratio": 1.0, "min_h_div_w_ratio": 0.42, "hw_stride": 16,
    "ae_stride_t": 8, "train_fps": 24, "speed_factor": 1.0, "too_long_factor": 5.0, "drop_short_ratio": 1.0,
    "min_num_frames": 9, "cfg": 0.1, "seed": 42, "max_read_retries": 4,
    "train_pipeline": {
        k: [{"trans_type": "ToTensorVideo"},
            {"trans_type": "CenterCropResizeVideo", "param": {"size": [64, 128], "interpolation_mode": "bicubic"}},
            {"trans_type": "ae_norm"}] for k in ("video", "image")},
}


@dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    data_txt: Path
    data_json: Path
    annotations: tuple[Path, ...]
    clips_txt: Path  # set3's random clips alone: no edge cases, no stills (what the demo's predictor learns)


def data_json_dict(data_txt: str | Path, **preprocess_overrides) -> dict:
    """data.json content for config A (plus overrides), pointing at `data_txt`."""
    preprocess = {**CONFIG_A, **preprocess_overrides}
    return {
        "dataset_param": {
            "dataset_type": "t2v",
            "basic_parameters": {"data_path": str(data_txt), "data_storage_mode": "combine"},
            "preprocess_parameters": preprocess,
            "use_text_processer": True, "enable_text_preprocess": True, "model_max_length": 32,
        },
        "dataloader_param": {
            "batch_size": 1, "num_workers": 0, "group_data": True,
            "collate_param": {"model_name": "GroupLength", "batch_size": 1, "num_frames": preprocess["num_frames"],
                              "ae_stride": 8, "ae_stride_t": preprocess["ae_stride_t"], "patch_size": 2,
                              "patch_size_t": 1},
        },
    }


def _edge_case_videos(folder: Path, rng: np.random.Generator) -> list[dict]:
    """set1: one record per video case of `_VIDEOS`, with the clips (and the corrupt and empty files) written."""
    records = []
    for vid, name, media, extra in _VIDEOS:
        path = folder / name
        if media is not None:  # always rewritten: a file from an older generator must not survive --overwrite
            h, w, fps, n = media
            write_video(path, n, h, w, fps, red_bands=RED_BAND if vid == "V11" else 0)
        rec = {"id": vid, "path": name, "cap": f"a synthetic clip {vid.lower()} with a moving green square"}
        if media is not None:
            h, w, fps, n = media
            rec.update(resolution={"height": h, "width": w}, num_frames=n, fps=fps)
        rec.update(extra)
        if vid == "V18":
            path.write_bytes(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
        elif vid == "V21":
            path.write_bytes(b"")
        records.append(rec)
    return records


def _edge_case_images(folder: Path) -> list:
    """set2: the image cases of `_IMAGES`, then records without caption or resolution and malformed ones."""
    records: list = []
    for iid, name, (h, w, mode) in _IMAGES:
        write_image(folder / name, h, w, mode)
        rec = {"id": iid, "path": name, "resolution": {"height": h, "width": w},
               "cap": ["a grey picture", "a picture with a blue border", "a flat grey image"] if iid == "I1"
               else f"synthetic image {iid.lower()}", "aesthetic": 5.0}
        records += [rec] * (4 if iid == "I1" else 1)
    good = {"height": 128, "width": 256}
    return records + [
        {"id": "N1", "path": "i_ok.jpg", "cap": None, "resolution": good},
        {"id": "N2", "path": "i_ok.jpg", "resolution": good},
        {"id": "N3", "path": "i_ok.jpg", "cap": "no resolution"},
        {"id": "N4", "path": "i_ok.jpg", "cap": "zero height", "resolution": {"height": 0, "width": 256}},
        {"id": "N5", "path": "i_ok.jpg", "cap": "no width", "resolution": {"height": 128}},
        {"id": "U1", "path": "notes.txt", "cap": "unsupported extension", "resolution": good},
        "M1: not an object",
        {"id": "M2", "cap": "no path", "resolution": good},
    ]


def _random_media(folder: Path, rng: np.random.Generator, num_videos: int, num_images: int) -> list[dict]:
    """set3: random videos and images that all pass the filter."""
    records = []
    sizes = [(128, 256), (96, 128), (128, 128), (144, 256)]
    for j in range(num_videos):
        h, w = sizes[int(rng.integers(len(sizes)))]
        fps = float(rng.choice([24, 25, 30]))
        n = int(rng.integers(24, 61))
        name = f"r{j:03d}.mp4"
        write_video(folder / name, n, h, w, fps)
        records.append({"id": f"R{j}", "path": name, "cap": f"random clip number {j}",
                        "resolution": {"height": h, "width": w}, "num_frames": n, "fps": fps})
    for j in range(num_images):
        h, w = sizes[int(rng.integers(len(sizes)))]
        name = f"p{j:03d}" + [".png", ".jpg", ".JPEG"][j % 3]
        write_image(folder / name, h, w, level=int(rng.integers(40, 220)))
        records.append({"id": f"P{j}", "path": name, "cap": f"random image number {j}",
                        "resolution": {"height": h, "width": w}})
    return records


def make_synthetic_dataset(out_dir: str | Path, num_videos: int = 8, num_images: int = 4,
                           seed: int = 0) -> SyntheticDataset:
    """Write the dataset under `out_dir` (created); returns its paths."""
    root = Path(out_dir).resolve()
    rng = np.random.default_rng(seed)
    sets = {name: root / name for name in ("set1", "set2", "set3")}
    for d in sets.values():
        d.mkdir(parents=True, exist_ok=True)
    records = {"set1": _edge_case_videos(sets["set1"], rng), "set2": _edge_case_images(sets["set2"]),
               "set3": _random_media(sets["set3"], rng, num_videos, num_images)}
    annos = []
    lines = []
    for name, recs in records.items():
        if not recs:
            continue
        anno = sets[name] / "anno.json"
        anno.write_text(json.dumps(recs, indent=1))
        annos.append(anno)
        lines += [f"{sets[name]},{anno}", ""]
    data_txt = root / "data.txt"
    data_txt.write_text("\n".join(lines))
    data_json = root / "data.json"
    data_json.write_text(json.dumps(data_json_dict(data_txt), indent=2))
    clips = sets["set3"] / "clips.json"
    clips.write_text(json.dumps([r for r in records["set3"] if "num_frames" in r], indent=1))
    clips_txt = root / "clips.txt"
    clips_txt.write_text(f"{sets['set3']},{clips}\n")
    (root / BROKEN_ON_PURPOSE).write_text(_BROKEN_HEADER + "".join(f"{p}  # {why}\n" for p, why in BROKEN_FILES))
    return SyntheticDataset(root, data_txt, data_json, tuple(annos), clips_txt)


# Files set1 breaks on purpose (read failures the training log announces as expected), and why.
BROKEN_FILES = (("set1/corrupt.mp4", "random bytes"), ("set1/missing.mp4", "annotated, never written"),
                ("set1/empty.mp4", "zero bytes"), ("set1/v24_10.mp4", "10 frames, annotated as 40"))
_BROKEN_HEADER = "# Broken on purpose by make_synthetic_dataset: the loader's read-failure path is part of the demo.\n"

OWN_VIDEOS = ("Your own videos: python -m mindspeed_mm_osp.tools.prepare_dataset FOLDER --out OUT writes the "
              "annotation JSON and data.txt from a folder of videos and images; the format of both is described in "
              "docs/data.md, section 'Your own videos'.")

# The valid range of every numeric flag (`errors.check_ranges`).
RANGES = {"--num-videos": dict(low=0, high=10000), "--num-images": dict(low=0, high=10000),
          "--seed": dict(low=0, high=2**32 - 1)}


@entry_point("make_synthetic_dataset")
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=OWN_VIDEOS)
    p.add_argument("out", help="output folder (created; refused when it holds files, unless --overwrite)")
    p.add_argument("--num-videos", type=int, default=8, help="random extra videos in set3")
    p.add_argument("--num-images", type=int, default=4, help="random extra images in set3")
    p.add_argument("--seed", type=int, default=0, help="seed of set3's random sizes, frame rates and lengths "
                   "(default: 0)")
    p.add_argument("--overwrite", action="store_true", help="write into an OUT that already holds files")
    a = p.parse_args(argv)
    check_ranges({"--num-videos": a.num_videos, "--num-images": a.num_images, "--seed": a.seed}, RANGES)
    check_output_dir("OUT", a.out, overwrite=a.overwrite)
    ds = make_synthetic_dataset(a.out, a.num_videos, a.num_images, a.seed)
    print(f"wrote {ds.root}: data.txt={ds.data_txt} data.json={ds.data_json}")
    print(f"{len(BROKEN_FILES)} files are broken on purpose (listed in {ds.root / BROKEN_ON_PURPOSE}): training "
          "reports their read failures as expected")


if __name__ == "__main__":
    main()


__all__ = ["CONFIG_A", "SyntheticDataset", "data_json_dict", "decode_frame_index", "frame_pixels",
           "make_synthetic_dataset", "write_image", "write_video"]
