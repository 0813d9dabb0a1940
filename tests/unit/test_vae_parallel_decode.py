"""Parallel WF-VAE decode: spans of latent frames with a measured warm-up equal the single-rank decode.

Span exactness is checked in fp64 (1e-10) on one process for spans that start inside the warm-up horizon and
beyond it; the multi-rank gather is checked in fp32 (1e-6) for 1-, 17- and 121-frame videos and for a latent
long enough that the plan actually splits it.
"""

import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.models.ae import WFVAE, tiny_ae_config_dict
from mindspeed_mm_osp.models.ae.parallel_decode import (
    Span,
    decode_parallel,
    decode_span,
    decoder_history,
    output_frames,
    plan_spans,
)
from mindspeed_mm_osp.testing import run_distributed


def _tiny(dtype=torch.float32) -> WFVAE:
    torch.manual_seed(0)
    return WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae")).to(dtype).eval()


@pytest.fixture(scope="module")
def vae64() -> WFVAE:
    return _tiny(torch.float64)


def test_output_frames_follow_the_8x_causal_layout():
    assert output_frames(0, 1) == (0, 1)
    assert output_frames(0, 3) == (0, 17)
    assert output_frames(1, 3) == (1, 17)
    assert output_frames(3, 16) == (17, 121)


@pytest.mark.parametrize("length,ranks,history", [(1, 2, 30), (16, 2, 30), (48, 2, 30), (100, 4, 30), (9, 3, 2)])
def test_plan_covers_the_latent_in_order_and_balances_work(length, ranks, history):
    spans = plan_spans(length, ranks, history)
    assert len(spans) == ranks
    kept = [s for s in spans if not s.empty]
    assert kept[0].start == 0 and kept[-1].end == length
    assert all(a.end == b.start for a, b in zip(kept, kept[1:]))
    assert all(s.warm == max(0, s.start - history) for s in kept)
    assert all(s.lookahead == (1 if s.end < length else 0) for s in kept)
    # No other split into contiguous spans has a smaller maximum work (checked exhaustively for 2 ranks).
    if ranks == 2:
        best = min(length if cut == length else max(cut + 1, length - max(0, cut - history))
                   for cut in range(1, length + 1))
        assert max(s.work for s in kept) == best


def test_short_latents_stay_on_one_rank():
    """Under `history` latent frames the warm-up of a second span is the whole prefix: no split."""
    spans = plan_spans(16, 2, 30)
    assert spans[0] == Span(0, 0, 16, 0) and spans[1].empty


def test_history_of_the_release_topology_is_30_latent_frames(vae64):
    assert decoder_history(vae64) == 30
    assert decoder_history(_tiny(torch.float32)) == 30  # NaN probing does not depend on the dtype or the weights


@pytest.mark.parametrize("span", [Span(0, 0, 5, 1), Span(0, 3, 40, 1), Span(2, 32, 41, 1), Span(10, 40, 45, 0),
                                  Span(9, 39, 40, 1)])
@torch.no_grad()
def test_span_with_warmup_equals_full_decode(vae64, span):
    z = torch.randn(1, 4, 45, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = vae64.decode(z, 1)
    first, last = output_frames(span.start, span.end)
    torch.testing.assert_close(decode_span(vae64, z, span, 1), full[:, :, first:last], rtol=0, atol=1e-10)


@torch.no_grad()
def test_too_short_warmup_is_not_exact(vae64):
    """The measured horizon is tight: one warm-up frame less changes the first kept frames (far above fp64
    round-off, 1e-15, though small with random weights)."""
    z = torch.randn(1, 4, 45, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = vae64.decode(z, 1)
    first, last = output_frames(40, 45)
    got = decode_span(vae64, z, Span(11, 40, 45, 0), 1)
    assert (got - full[:, :, first:last]).abs().max() > 1e-12


def _decode(rank, world_size, latent_frames):
    vae = _tiny()
    z = torch.randn(1, 4, latent_frames, 2, 2, generator=torch.Generator().manual_seed(latent_frames))
    video = decode_parallel(vae, z, 1)
    return (video, vae.decode(z, 1)) if rank == 0 else video


@pytest.mark.parametrize("latent_frames", [1, 3, 16, 44])  # videos of 1, 17, 121 and 345 frames
def test_two_rank_decode_equals_single_rank(latent_frames):
    (video, single), other = run_distributed(_decode, 2, latent_frames)
    assert other is None
    assert video.shape == single.shape == (1, 3, 8 * latent_frames - 7, 16, 16)
    torch.testing.assert_close(video, single, rtol=0, atol=1e-6)
