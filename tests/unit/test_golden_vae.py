"""WF-VAE against the reference implementation's own outputs (tests/golden, see its README).

The tiny reference VAE's weights load through `VideoAutoencoder` (`ae.from_pretrained`, our strict checkpoint
loader) from its `ae` config block. Posterior, normalised latent, decode and the chunked ("tiled") encode/decode
must match the reference to 1e-5 (measured: <= 4e-6; the reference's own chunked and one-pass runs differ by up
to 9e-6 in float32 and agree in float64).
"""

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.ae import AEConfig
from mindspeed_mm_osp.models.ae import VideoAutoencoder
from golden.reference import read_reference

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Reference tensors, and the VAE config pointing at the reference parameters written as a weights file."""
    meta, tensors, weights = read_reference("vae_tiny", tmp_path_factory.mktemp("golden_vae"))
    config = from_dict(AEConfig, {**meta["ae"], "from_pretrained": str(weights)}, file="vae_tiny.json", path="ae")
    return config, tensors


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL, msg=lambda m: f"{what} differs from the reference: {m}")


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_encode_and_decode_match_the_reference(golden, chunked):
    """One pass, or chunked as the reference tiles (8 pixel frames per encoder chunk, 2 latent frames per decoder
    chunk): posterior mean/logvar, `(mean - shift) * scale`, and the decode of the normalised mean."""
    config, ref = golden
    ae = VideoAutoencoder(dataclasses.replace(config, use_tiling=chunked, encode_tile_latent_frames=1,
                                              tile_latent_frames=2))
    mean, logvar = ae.encode_posterior(ref["input.video"])
    prefix = "output.tiled_" if chunked else "output."
    _close(mean, ref[prefix + "posterior_mean"], "posterior mean")
    _close(logvar, ref[prefix + "posterior_logvar"], "posterior logvar")
    _close(ae.normalize(mean), ref["output.normalised_latent"], "normalised latent")
    _close(ae.decode(ref["output.normalised_latent"]), ref["output.decoded"], "decoded video")
