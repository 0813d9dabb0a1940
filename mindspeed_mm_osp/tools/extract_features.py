"""Extract the feature cache (VAE posteriors, T5/CLIP embeddings) for training without encoders.

    torchrun --nproc_per_node N -m mindspeed_mm_osp.tools.extract_features \
        --mm-data data.json --mm-model model.json --out DIR [--shard-size 32]

Each rank encodes a disjoint set of shards; re-running after an interruption skips every shard
whose manifest and checksum are intact. Rank 0 then writes and verifies DIR/index.json and prints the
keys that train from it: `dataset_param.feature_cache_dir` = DIR in the data JSON, `load_video_features` and
`load_text_features` true in the model JSON (see `mindspeed_mm_osp.features` and docs/data.md).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path

from ..errors import UserError, check_ranges, entry_point, env_int


# The valid range of every numeric flag (`errors.check_ranges`).
RANGES = {"--shard-size": dict(low=1, high=1 << 20), "--batch-size": dict(low=1, high=4096),
          "--text-batch-size": dict(low=1, high=1 << 16), "--seed": dict(low=0, high=2**32 - 1),
          "--global-batch-size": dict(low=1, high=1 << 24), "--stop-after-shards": dict(low=0)}


def _check(a: argparse.Namespace):
    """Flag ranges, the configs and the files they name, the output folder; returns the configs."""
    from ..config import load_data_config, load_model_config

    check_ranges({flag: getattr(a, flag[2:].replace("-", "_")) for flag in RANGES}, RANGES)
    data_cfg, model_cfg = load_data_config(a.mm_data), load_model_config(a.mm_model)
    model_cfg.check_paths(a.mm_model)
    data_cfg.check_paths(a.mm_data)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise UserError(f"--out {a.out}: is a file, expected the cache folder (created; reused to resume)")
    return data_cfg, model_cfg


def train_from_cache(data_json: str, model_json: str, cache: Path) -> str:
    """The exact keys and command that train from the finished cache `cache`."""
    return "\n".join([
        "to train from this cache, without the VAE and text encoders:",
        f'  {data_json}: "dataset_param": {{"feature_cache_dir": "{cache}", ...}}',
        f'  {model_json}: "load_video_features": true, "load_text_features": true (top level)',
        f"  then: pretrain.py --mm-data {data_json} --mm-model {model_json} ... (the flags of your run; "
        "--global-batch-size of any size when extracted with --global-batch-size 1)"])


@entry_point("extract_features")
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mm-data", required=True, help="data JSON (the training one)")
    p.add_argument("--mm-model", required=True, help="model JSON with the ae, text_encoder(_2) blocks")
    p.add_argument("--out", required=True, help="cache folder (created; reused to resume)")
    p.add_argument("--shard-size", type=int, default=32, help="samples per shard file (held in memory while written)")
    p.add_argument("--batch-size", type=int, default=1, help="same-shape samples per VAE forward")
    p.add_argument("--text-batch-size", type=int, default=64, help="captions per T5/CLIP forward")
    p.add_argument("--seed", type=int, default=1234, help="picks the cached temporal window of long clips")
    p.add_argument("--global-batch-size", type=int, default=1,
                   help="minority filter of the extracted set (min_samples_per_shape_factor x it); 1 keeps a "
                   "superset of any training run")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupted run
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    a = p.parse_args(argv)

    import torch.distributed as dist

    from .. import platform
    from ..features import extract_features

    world, rank = env_int("WORLD_SIZE", 1, low=1), env_int("RANK", 0)
    data_cfg, model_cfg = _check(a)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s")
    if world > 1:
        platform.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks meet only at the end; a long extraction must not trip the collective timeout.
        dist.init_process_group(platform.dist_backend(), timeout=datetime.timedelta(days=2))
    try:
        result = extract_features(data_cfg, model_cfg, a.out,
                                  shard_size=a.shard_size, batch_size=a.batch_size, text_batch_size=a.text_batch_size,
                                  seed=a.seed, global_batch_size=a.global_batch_size,
                                  stop_after_shards=a.stop_after_shards, progress=not a.no_progress)
        print(f"rank {rank}: computed shards {result.computed}, reused {result.reused}"
              + (f"; index {result.index_path}" if result.complete and rank == 0 else ""), flush=True)
        if result.complete and rank == 0:
            print(train_from_cache(a.mm_data, a.mm_model, Path(a.out).resolve()), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
