"""Cost of checkpoint integrity: the checksum computed while a checkpoint file is written, as a share of the save.

A training checkpoint of the width-256 predictor (release stage layout scaled to 4 heads x 64, as
`bench_suv_vs_dense.py`) holds four fp32 copies of the parameters: the model, its EMA and the optimizer's two Adam
moments (the layout `save_checkpoint` writes, with a per-parameter `step`). It is saved through the package's atomic
write (temporary file, fsync, rename) with and without the checksumming writer (XXH3-64, `checkpoint.manifest`),
interleaved, and the median times are compared. Also measured over the same bytes: XXH3-64 and the checksums of
the standard library (the candidates), each as a share of the save, and `--verify-checkpoint`'s extra read as a
share of loading the file.

    python bench/bench_checkpoint_integrity.py            # release layout at width 256 (76M parameters)
    python bench/bench_checkpoint_integrity.py --quick    # one block per stage (< 1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
import xxhash

from bench_suv_vs_dense import LAYOUT
from mindspeed_mm_osp.checkpoint.io import atomic_save
from mindspeed_mm_osp.checkpoint.manifest import file_digest
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.io_atomic import atomic_write
from mindspeed_mm_osp.models.predictor import SparseUMMDiT


def checkpoint_payload(quick: bool) -> dict:
    layout = {**LAYOUT, "num_layers": [1] * 7, "sparse_n": [1, 2, 4, 8, 4, 2, 1]} if quick else LAYOUT
    model = SparseUMMDiT(from_dict(PredictorConfig, layout))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = {k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v), "step": torch.tensor(100.0)}
                 for k, v in weights.items() if v.is_floating_point()}
    return {"model": weights, "ema_model": {k: v.clone() for k, v in weights.items()},
            "optimizer": {"format": "bench", "state": optimizer}, "iteration": 100}


def hash_seconds(data: bytes) -> dict[str, float]:
    """Seconds each checksum takes over `data`."""
    algorithms = {"xxh3_64": lambda b: xxhash.xxh3_64(b).digest(), "crc32 (zlib)": zlib.crc32,
                  "adler32 (zlib)": zlib.adler32, "blake2b": lambda b: hashlib.blake2b(b).digest(),
                  "sha1": lambda b: hashlib.sha1(b).digest(), "sha256": lambda b: hashlib.sha256(b).digest()}
    out = {}
    for name, fn in algorithms.items():
        t0 = time.perf_counter()
        fn(data)
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="saves of each kind (interleaved)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    torch.manual_seed(0)
    payload = checkpoint_payload(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_optim_rng.pt"
        times = {"plain": [], "checksum": []}
        for _ in range(repeats):
            for kind in times:
                t0 = time.perf_counter()
                if kind == "checksum":
                    atomic_save(payload, path)
                else:
                    atomic_write(path, lambda f: torch.save(payload, f))
                times[kind].append(time.perf_counter() - t0)
        size = path.stat().st_size
        t0 = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=True)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        file_digest(path)
        verify_s = time.perf_counter() - t0
    plain, summed = statistics.median(times["plain"]), statistics.median(times["checksum"])
    buf = io.BytesIO()
    torch.save(payload, buf)
    seconds = hash_seconds(buf.getvalue())
    print(f"checkpoint {size / 2**20:.0f} MiB ({'quick layout' if args.quick else 'release layout, width 256'}), "
          f"{repeats} saves of each kind, medians")
    print(f"save without checksum {plain:.3f} s, with XXH3-64 while writing {summed:.3f} s: "
          f"difference {100 * (summed - plain) / summed:+.1f}% of the save (noise included)")
    print(f"--verify-checkpoint read + XXH3-64 {verify_s:.3f} s vs torch.load {load_s:.3f} s "
          f"({100 * verify_s / load_s:.0f}% of the load)")
    print("each checksum over the same bytes, as a share of the save: " + ", ".join(
        f"{k} {100 * v / plain:.1f}% ({len(buf.getvalue()) / v / 1e9:.1f} GB/s)" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
