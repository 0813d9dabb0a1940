"""Extract the feature cache (VAE posteriors, T5/CLIP embeddings) for training without encoders.

    torchrun --nproc_per_node N -m mindspeed_mm_osp.tools.extract_features \
        --mm-data data.json --mm-model model.json --out DIR [--shard-size 32]

Each rank encodes a disjoint set of shards; re-running after an interruption skips every shard
whose manifest and checksum are intact. Rank 0 then writes and verifies DIR/index.json. Set
`dataset_param.feature_cache_dir` to DIR and `load_video_features`/`load_text_features` to train
from it (see `mindspeed_mm_osp.features`).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os


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
                   help="minority filter of the extracted set (4 x it); 1 keeps a superset of any training run")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupted run
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    a = p.parse_args(argv)

    import torch.distributed as dist

    from .. import platform
    from ..config import load_data_config, load_model_config
    from ..features import extract_features

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s")
    if world > 1:
        platform.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks meet only at the end; a long extraction must not trip the collective timeout.
        dist.init_process_group(platform.dist_backend(), timeout=datetime.timedelta(days=2))
    try:
        result = extract_features(load_data_config(a.mm_data), load_model_config(a.mm_model), a.out,
                                  shard_size=a.shard_size, batch_size=a.batch_size, text_batch_size=a.text_batch_size,
                                  seed=a.seed, global_batch_size=a.global_batch_size,
                                  stop_after_shards=a.stop_after_shards, progress=not a.no_progress)
        print(f"rank {rank}: computed shards {result.computed}, reused {result.reused}"
              + (f"; index {result.index_path}" if result.complete and rank == 0 else ""), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
