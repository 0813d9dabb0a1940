"""Loader sharding of `pretrain.py`: plain DP and encoder DP, and where a resume restarts."""

from mindspeed_mm_osp.training.batches import LoaderShard


def _plan(**kw):
    base = dict(rank=3, world_size=4, dp_rank=1, dp_size=2, tp_rank=1, tp_size=2, micro_batch_size=2,
                global_batch_size=8, consumed_samples=24)
    return LoaderShard.plan(**{**base, **kw})


def test_plain_dp_shards_by_dp_rank_and_resumes_at_consumed_samples():
    shard = _plan(encoder_dp=False)
    assert (shard.dp_rank, shard.dp_size, shard.global_batch_size, shard.consumed_samples) == (1, 2, 8, 24)
    assert shard.start_ordinal == 24 // (2 * 2)
    assert (shard.encoder_dp_size, shard.encoder_dp_rank) == (1, 0)


def test_encoder_dp_shards_by_world_rank_in_rounds_of_tp_micro_batches():
    # 24 samples over DP 2 with micro-batch 2: this replica trained 6 micro-batches = 3 fetch rounds of TP 2
    shard = _plan(encoder_dp=True, consumed_samples=24)
    assert (shard.dp_rank, shard.dp_size, shard.global_batch_size) == (3, 4, 4 * 2)
    assert shard.start_ordinal == 6 and shard.consumed_samples == 3 * 4 * 2
    assert (shard.encoder_dp_size, shard.encoder_dp_rank) == (2, 1)
    # resuming in the middle of a round restarts the round (the stream skips its trained entries)
    assert _plan(encoder_dp=True, consumed_samples=28).consumed_samples == 3 * 4 * 2


def test_encoder_dp_without_tp_is_plain_dp():
    assert _plan(encoder_dp=True, tp_size=1, tp_rank=0) == _plan(encoder_dp=False, tp_size=1, tp_rank=0)
