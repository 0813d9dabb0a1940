"""VideoAutoencoder: shapes, normalisation, sampling, frozen state, loading via `from_pretrained`."""

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict, write_tiny_wfvae


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_wfvae(tmp_path_factory.mktemp("tiny_vae"), seed=0)


def _config(checkpoint, **overrides) -> AEConfig:
    data = tiny_ae_config_dict()
    data["from_pretrained"] = str(checkpoint)
    data.update(overrides)
    return from_dict(AEConfig, data, path="ae")


@pytest.fixture(scope="module")
def ae(checkpoint) -> VideoAutoencoder:
    return VideoAutoencoder(_config(checkpoint))


def _video(frames=9, size=32, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=gen) * 2 - 1


def test_tiny_config_dict_is_json_and_loads():
    import json

    data = json.loads(json.dumps(tiny_ae_config_dict()))
    config = from_dict(AEConfig, data, path="ae")
    assert (config.base_channels, config.latent_dim, config.encoder_energy_flow_hidden_size,
            config.decoder_energy_flow_hidden_size) == (8, 4, 4, 12)


def test_encode_decode_shapes(ae):
    latents = ae.encode(_video(size=64, batch=2), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 2, 8, 8)
    assert ae.latent_shape(9, 64, 64) == (4, 2, 8, 8)
    assert ae.latent_shape(121, 576, 1024) == (4, 16, 72, 128)
    video = ae.decode(latents)
    assert video.shape == (2, 3, 9, 64, 64) and video.dtype == torch.float32


def test_invalid_lengths_are_rejected(ae):
    with pytest.raises(ValueError, match="frames = 1 mod 8"):
        ae.encode_posterior(_video(frames=8))
    with pytest.raises(ValueError, match="divisible by 8"):
        ae.latent_shape(9, 60, 64)


def test_normalise_round_trip(ae):
    z = torch.randn(2, 4, 3, 4, 4, dtype=torch.float32)
    scale = torch.tensor(tiny_ae_config_dict()["scale"]).reshape(1, 4, 1, 1, 1)
    shift = torch.tensor(tiny_ae_config_dict()["shift"]).reshape(1, 4, 1, 1, 1)
    torch.testing.assert_close(ae.normalize(z), (z - shift) * scale)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)


def test_sample_latents_uses_the_generator(ae):
    mean, logvar = ae.encode_posterior(_video())
    assert mean.shape == logvar.shape == (1, 4, 2, 4, 4)
    assert logvar.min() >= -30 and logvar.max() <= 20
    a = ae.sample_latents(mean, logvar, torch.Generator().manual_seed(1))
    b = ae.sample_latents(mean, logvar, torch.Generator().manual_seed(1))
    c = ae.sample_latents(mean, logvar, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, ae.normalize(mean + torch.exp(0.5 * logvar) * eps))
    torch.testing.assert_close(ae.encode(_video(), torch.Generator().manual_seed(1)), a)


def test_tiling_flag_does_not_change_results(checkpoint, ae):
    untiled = VideoAutoencoder(_config(checkpoint, use_tiling=False))
    video = _video(frames=17)
    m1, l1 = ae.encode_posterior(video)
    m2, l2 = untiled.encode_posterior(video)
    torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ae.decode(m1), untiled.decode(m1), rtol=1e-4, atol=1e-5)


def test_frozen_eval_and_dtype(checkpoint, ae):
    assert not any(p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.training and not any(m.training for m in ae.modules())
    half = VideoAutoencoder(_config(checkpoint, dtype="bf16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.scale.dtype == torch.bfloat16
    latents = half.encode(_video(frames=1, size=16), torch.Generator().manual_seed(0))
    assert latents.dtype == torch.bfloat16 and half.decode(latents).shape == (1, 3, 1, 16, 16)


def test_from_pretrained_loads_the_checkpoint(checkpoint, ae):
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]["gen_model"]
    ours = ae.vae.state_dict()
    assert ours.keys() == saved.keys()
    assert all(torch.equal(ours[k], saved[k]) for k in saved)
    random_init = VideoAutoencoder(dataclasses.replace(_config(checkpoint), from_pretrained=None))
    assert not torch.equal(random_init.vae.decoder.conv_in.conv.weight, ours["decoder.conv_in.conv.weight"])


def test_scale_and_shift_are_required(checkpoint):
    with pytest.raises(ValueError, match="scale and ae.shift"):
        VideoAutoencoder(dataclasses.replace(_config(checkpoint), scale=None))
