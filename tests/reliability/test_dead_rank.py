"""One rank of a 2-rank run dies (os._exit) or hangs (sleeps) in the middle of a step: the surviving rank
leaves its collective with an error within the configured `--distributed-timeout-minutes` instead of waiting
forever, and we measure how long that took."""

from __future__ import annotations

import time

import pytest

from reliability_harness import cli_main, log, start_ranks, train_argv

pytestmark = pytest.mark.slow

# Short for the test, still long for healthy collectives of this tiny run (the ranks move in lockstep); a dead
# peer is noticed at once, so that case can afford a longer one.
TIMEOUT_MINUTES = {"dies": 0.25, "hangs": 0.15}


def _run_with_faulty_rank(rank, world_size, argv, mode: str, marker: str) -> dict:
    """Rank 1 dies or hangs inside the forward pass of its second micro-batch; rank 0 runs pretrain.py's main."""
    import os

    from mindspeed_mm_osp.training import trainer

    if rank == 1:
        loss, calls = trainer.flow_matching_loss, []

        def faulty_loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                with open(marker, "w") as f:
                    f.write(repr(time.time()))
                if mode == "dies":
                    os._exit(17)
                time.sleep(3600)
            return loss(*args, **kwargs)

        trainer.flow_matching_loss = faulty_loss
    out = cli_main(argv)
    out["ended"] = time.time()
    return out


@pytest.mark.parametrize("mode, layout", [("dies", []), ("hangs", []), ("dies", ["--context-parallel-size", "2"]),
                                          ("hangs", ["--context-parallel-size", "2"])],
                         ids=["dies-dp2", "hangs-dp2", "dies-cp2", "hangs-cp2"])
def test_surviving_rank_exits_instead_of_hanging(micro_assets, tmp_path, mode, layout):
    """With CP=2 the survivor waits for its dead or hung peer inside the predictor's all-to-all."""
    marker = tmp_path / "fault_time"
    timeout = TIMEOUT_MINUTES[mode] * 60
    argv = train_argv(micro_assets, "--distributed-timeout-minutes", str(TIMEOUT_MINUTES[mode]), *layout, iters=4)
    ranks = start_ranks(_run_with_faulty_rank, 2, argv, mode, str(marker))
    try:
        results = ranks.results(timeout=timeout + 20, wait_for={0})
    finally:
        ranks.procs[1].kill()
        ranks.reap(grace=1.0)
    assert 0 in results, "the surviving rank did not exit"
    ok, out = results[0]
    assert ok, out
    waited = out["ended"] - float(marker.read_text())
    assert out["code"] != 0
    message = out["stderr"].strip().splitlines()[-1]
    # gloo's own words: "Connection closed/reset by peer ... remote worker crashing" or "Timed out waiting ..."
    assert "remote worker" in message or "Timed out" in message, message
    assert waited < timeout + 10
    log(f"dead rank ({mode}, {' '.join(layout) or 'DP=2'}): rank 0 exited with status {out['code']} {waited:.1f}s after rank 1's fault "
        f"(timeout {timeout:.0f}s); last line: {message[:220]}")


def _group_timeouts(rank, world_size, minutes: float, cp: int) -> dict:
    import datetime

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mindspeed_mm_osp.parallel import initialize_distributed

    initialize_distributed(tp=1, cp=cp, timeout_minutes=minutes)
    groups = {"world": dist.group.WORLD, "data_parallel": ps.get_data_parallel_group(),
              "tensor_parallel": ps.get_tensor_model_parallel_group(), "model_parallel": ps.get_model_parallel_group(),
              "context_parallel": ps.get_context_parallel_group(),
              "data_context_parallel": ps.get_data_parallel_group(with_context_parallel=True)}
    want = datetime.timedelta(minutes=minutes)
    return {name: g._get_backend(torch.device("cpu")).options._timeout == want for name, g in groups.items()}


@pytest.mark.parametrize("cp", [1, 2])
def test_every_process_group_gets_the_configured_timeout(cp):
    """The minimal form of the bug above (gloo groups; the run's collectives go through megatron's groups),
    with DP=2 and with CP=2 (the Ulysses all-to-alls run in the context-parallel group)."""
    from mindspeed_mm_osp.testing import run_distributed

    per_rank = run_distributed(_group_timeouts, 2, 0.05, cp, init_megatron=False)
    assert all(all(ok.values()) for ok in per_rank), per_rank
