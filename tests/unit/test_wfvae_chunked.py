"""Chunked ("tiling") encode/decode equals the one-pass result (fp64, 1e-10); docs/model.md, "WF-VAE".

Covers the cases the reference gets wrong: 1- and 9-frame clips (its chunk search fails),
a 1-latent-frame last chunk (missing look-ahead) and 1-frame decoder chunks (crash).
Clips are 16x16 pixels (2x2 latents) to stay fast on CPU; the time handling does not depend on H/W.
"""

import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.models.ae import WFVAE, tiny_ae_config_dict
from mindspeed_mm_osp.models.ae.modules import Streamable
from mindspeed_mm_osp.models.ae.wfvae import chunk_spans, configure_streaming

FRAMES = [1, 9, 17, 25, 121]  # 121 = the release clip length
DECODE_CHUNKS = [1, 2, 3, 4, 5]  # latent frames
ENCODE_CHUNKS = [1, 2, 3]  # latent frames = 8, 16, 24 pixel frames


@pytest.fixture(scope="module")
def model() -> WFVAE:
    torch.manual_seed(0)
    return WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae")).double().eval()


def test_chunk_schedule():
    assert chunk_spans(1, 4) == [(0, 1)]
    assert chunk_spans(16, 4) == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 16)]
    assert chunk_spans(121, 8) == [(0, 1)] + [(1 + 8 * i, 9 + 8 * i) for i in range(15)]


def _check(model, frames, encode_chunks, decode_chunks, pixels=16):
    gen = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, pixels, pixels, generator=gen, dtype=torch.float64) * 2 - 1
    params = model.encode(video)
    assert params.shape == (1, 8, (frames - 1) // 8 + 1, pixels // 8, pixels // 8)
    for chunk in encode_chunks:
        torch.testing.assert_close(model.encode(video, chunk), params, rtol=0, atol=1e-10)

    # Decode a latent with unit-scale variation in every frame (a random-init encoder's output is too smooth).
    latent = torch.randn(1, 4, params.shape[2], pixels // 8, pixels // 8, generator=gen, dtype=torch.float64)
    full = model.decode(latent)
    assert full.shape == (1, 3, frames, pixels, pixels)
    for chunk in decode_chunks:
        torch.testing.assert_close(model.decode(latent, chunk), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("frames", FRAMES)
@torch.no_grad()
def test_chunked_equals_full(model, frames):
    _check(model, frames, ENCODE_CHUNKS, DECODE_CHUNKS)


@torch.no_grad()
def test_encoder_is_causal(model):
    """Latent frame k depends only on pixel frames <= 8k (frame 0 alone gives latent frame 0)."""
    video = torch.rand(1, 3, 17, 16, 16, dtype=torch.float64)
    changed = video.clone()
    changed[:, :, 9:] += 1.0
    a, b = model.encode(video), model.encode(changed)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=0, atol=1e-12)
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-6


@torch.no_grad()
def test_streaming_state_is_reset_between_calls(model):
    """Caches never leak into the next call (the reference froze the clip length after one call)."""
    z1 = torch.randn(1, 4, 3, 2, 2, dtype=torch.float64)
    z2 = torch.randn(1, 4, 5, 2, 2, dtype=torch.float64)
    first = model.decode(z1, 1)
    model.decode(z2, 2)
    torch.testing.assert_close(model.decode(z1, 1), first, rtol=0, atol=0)
    torch.testing.assert_close(model.decode(z2), model.decode(z2, 2), rtol=0, atol=1e-10)


@torch.no_grad()
def test_caches_are_small_copies(model):
    """Memory is bounded by the chunk: caches hold <= 2 frames and own their storage (no views of the chunk)."""
    z = torch.randn(1, 4, 5, 2, 2, dtype=torch.float64)
    try:
        configure_streaming(model.decoder, True, first_chunk=True)
        model.decoder(z[:, :, :1])
        configure_streaming(model.decoder, True, first_chunk=False, latent_lookahead=1)
        model.decoder(z[:, :, 1:4])
        caches = [m.cache for m in model.decoder.modules() if isinstance(m, Streamable) and m.cache is not None]
        assert len(caches) > 20
        for cache in caches:
            assert cache.shape[2] <= 2
            assert cache.untyped_storage().nbytes() == cache.numel() * cache.element_size()
    finally:
        configure_streaming(model.decoder, False)
    assert all(m.cache is None for m in model.decoder.modules() if isinstance(m, Streamable))
