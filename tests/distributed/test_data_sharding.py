"""Loader sharding on real megatron groups (world 4, TP 2 → DP 2): TP peers get bit-identical
batches, DP ranks get disjoint samples of the same shape each step."""

import hashlib

import pytest

from mindspeed_mm_osp.testing import run_distributed

STEPS = 4


def _loader_digests(rank, world_size, data_json, t5_dir, clip_dir):
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from mindspeed_mm_osp.config import load_data_config
    from mindspeed_mm_osp.data import build_train_dataloader

    loader, _ = build_train_dataloader(
        load_data_config(data_json), tokenizer=AutoTokenizer.from_pretrained(t5_dir),
        tokenizer_2=AutoTokenizer.from_pretrained(clip_dir), dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(), micro_batch_size=1, global_batch_size=2, consumed_samples=0,
        seed=3, num_workers=0)
    out = []
    for step, batch in zip(range(STEPS), loader):
        h = hashlib.sha256()
        for key, tensor in sorted(batch.tensors().items()):
            h.update(tensor.numpy().tobytes())
        out.append((tuple(batch.video.shape), h.hexdigest()))
    return ps.get_data_parallel_rank(), out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from mindspeed_mm_osp.models.text.tiny import write_tiny_clip, write_tiny_t5
    from mindspeed_mm_osp.tools.make_synthetic_dataset import make_synthetic_dataset

    d = tmp_path_factory.mktemp("shard")
    ds = make_synthetic_dataset(d / "data", num_videos=0, num_images=0)
    return str(ds.data_json), str(write_tiny_t5(d / "t5")), str(write_tiny_clip(d / "clip"))


def test_tp_peers_identical_dp_disjoint(assets):
    results = run_distributed(_loader_digests, 4, *assets, tp=2, timeout=240)
    by_dp = {}
    for dp_rank, batches in results:
        by_dp.setdefault(dp_rank, []).append(batches)
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():
        assert len(peers) == 2 and peers[0] == peers[1]  # TP peers: bit-identical batches
    a, b = by_dp[0][0], by_dp[1][0]
    assert len(a) == len(b) == STEPS
    assert [s for s, _ in a] == [s for s, _ in b]  # same shape on both DP ranks every step
    assert not {h for _, h in a} & {h for _, h in b}  # different samples
