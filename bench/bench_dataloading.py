"""Data-loading throughput: clips/s of 33-frame 256x256 training samples, decord vs PyAV,
0 and 2 DataLoader workers, through the full pipeline (decode, crop/resize, ae_norm, caption
cleaning, two tokenizers, collate).

    python bench/bench_dataloading.py [--quick] [--clips N] [--workers 0 2]

Prints a table and the PyAV/decord time ratio per worker count (> 1: PyAV slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path



def _write_dataset(root: Path, clips: int, frames: int, gop: int) -> Path:
    from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict, write_video

    recs = []
    for k in range(clips):
        fps = 30.0 if k % 2 else 24.0  # half the clips need fps resampling
        n = frames if fps == 24 else int(frames * 1.25) + 1
        write_video(root / f"c{k}.mp4", n, 256, 256, fps, gop=gop)
        recs.append({"path": f"c{k}.mp4", "cap": f"a moving square, clip {k}", "num_frames": n, "fps": fps,
                     "resolution": {"height": 256, "width": 256}})
    (root / "anno.json").write_text(json.dumps(recs))
    (root / "data.txt").write_text(f"{root},{root / 'anno.json'}\n")
    cfg = data_json_dict(root / "data.txt", num_frames=33, min_num_frames=33, max_height=256, max_width=256,
                         max_hxw=65536, min_hxw=65536, train_pipeline={
                             k: [{"trans_type": "ToTensorVideo"},
                                 {"trans_type": "CenterCropResizeVideo",
                                  "param": {"size": [256, 256], "interpolation_mode": "bicubic"}},
                                 {"trans_type": "ae_norm"}] for k in ("video", "image")})
    cfg["dataset_param"]["model_max_length"] = 512
    (root / "data.json").write_text(json.dumps(cfg))
    return root / "data.json"


def _measure(data_json: Path, tokenizers, reader: str, workers: int, epochs: int) -> float:
    from mindspeed_mm_osp.config import from_dict, read_json
    from mindspeed_mm_osp.config.data import DataConfig
    from mindspeed_mm_osp.data import build_train_dataloader

    raw = read_json(data_json)
    raw["dataset_param"]["preprocess_parameters"]["video_reader_type"] = reader
    cfg = from_dict(DataConfig, raw)
    loader, _ = build_train_dataloader(cfg, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], dp_rank=0, dp_size=1,
                                       micro_batch_size=1, global_batch_size=1, consumed_samples=0, seed=0,
                                       num_workers=workers, num_epochs=epochs)
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    n, t0 = 0, time.perf_counter()
    for batch in it:
        assert batch.video.shape == (1, 3, 33, 256, 256)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    p.add_argument("--clips", type=int, default=None, help="distinct clips (default 8 quick / 16)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the clips (default 2 quick / 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = p.parse_args(argv)
    clips = a.clips or (8 if a.quick else 16)
    epochs = a.epochs or (2 if a.quick else 4)
    logging.disable(logging.WARNING)

    import torch
    from transformers import AutoTokenizer

    import av
    import decord
    from mindspeed_mm_osp.models.text.tiny import write_tiny_clip, write_tiny_t5

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_json = _write_dataset(tmp, clips, 33, gop=16)
        tokenizers = (AutoTokenizer.from_pretrained(str(write_tiny_t5(tmp / "t5"))),
                      AutoTokenizer.from_pretrained(str(write_tiny_clip(tmp / "clip"))))
        rows = {}
        for workers in a.workers:
            for reader in ("decord", "pyav"):
                rows[(reader, workers)] = _measure(data_json, tokenizers, reader, workers, epochs)
    print(f"# bench_dataloading: {clips} clips x {epochs} epochs, 33x256x256 (half at 30 fps -> resampled), "
          f"mbs 1; python {platform.python_version()}, torch {torch.__version__}, av {av.__version__}, "
          f"decord {decord.__version__}, {torch.get_num_threads()} threads, machine {platform.machine()}")
    print(f"{'reader':<8}{'workers':>8}{'clips/s':>10}")
    for (reader, workers), cps in rows.items():
        print(f"{reader:<8}{workers:>8}{cps:>10.2f}")
    for workers in a.workers:
        ratio = rows[("decord", workers)] / rows[("pyav", workers)]
        print(f"PyAV/decord time ratio, {workers} workers: {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
