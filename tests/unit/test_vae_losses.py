"""WF-VAE training parts: the loss terms against their definitions, inflation, the perceptual backbone file, the
discriminator, the release-layout export and the training config's errors."""

import json

import pytest
import torch

from mindspeed_mm_osp.config.ae import AEConfig
from mindspeed_mm_osp.config.loader import ConfigError, from_dict
from mindspeed_mm_osp.models.ae import WFVAE, load_wfvae_checkpoint, tiny_ae_config_dict
from mindspeed_mm_osp.models.ae.checkpoint import CheckpointKeyError, save_released_checkpoint
from mindspeed_mm_osp.models.ae.discriminator import PatchDiscriminator3D
from mindspeed_mm_osp.models.ae.inflate import inflate_from_checkpoint, inflate_kernel
from mindspeed_mm_osp.models.ae.losses import adaptive_weight, kl_divergence, reconstruction_loss, wavelet_loss
from mindspeed_mm_osp.models.ae.modules import CausalConv3d, HaarWaveletTransform3D
from mindspeed_mm_osp.models.ae.perceptual import PerceptualLoss, conv_indices


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae"))


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)


def test_reconstruction_is_a_per_frame_sum():
    x, y = torch.zeros(2, 3, 5, 4, 4), torch.full((2, 3, 5, 4, 4), 0.5)
    assert float(reconstruction_loss(x, y, "l1")) == pytest.approx(0.5 * 3 * 16)
    assert float(reconstruction_loss(x, y, "l2")) == pytest.approx(0.25 * 3 * 16)


def test_forward_carries_the_input_haar_coefficients_and_matches_decode(vae):
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mean_params = vae.encode(x)
    out = vae(x, torch.zeros(1, 4, 2, 4, 4))
    torch.testing.assert_close(out.mean, mean_params[:, :4])
    torch.testing.assert_close(out.reconstruction, vae.decode(out.mean))
    level1 = HaarWaveletTransform3D()(x)[:, :3]
    torch.testing.assert_close(out.coeffs[0][0], HaarWaveletTransform3D()(level1))
    assert float(wavelet_loss(((out.coeffs[0][0], out.coeffs[0][0]),))) == 0.0
    assert float(wavelet_loss(out.coeffs).detach()) > 0.0


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    w = torch.randn(3, 3, requires_grad=True)
    a, b = (w * 2).sum(), (w ** 2).sum()
    expected = torch.full((3, 3), 2.0).norm() / ((2 * w).norm() + 1e-6)
    torch.testing.assert_close(adaptive_weight(a, b, w), expected.detach())


def test_inflated_causal_conv_codes_every_frame_as_the_image_conv():
    conv2d = torch.nn.Conv2d(3, 5, 3, padding=1)
    conv3d = CausalConv3d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv3d.conv.weight.copy_(inflate_kernel(conv2d.weight, 3, "tail"))
        conv3d.conv.bias.copy_(conv2d.bias)
    video = torch.randn(2, 3, 4, 8, 8)
    per_frame = torch.stack([conv2d(video[:, :, t]) for t in range(4)], dim=2)
    torch.testing.assert_close(conv3d(video), per_frame)
    still = video[:, :, :1].expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        conv3d.conv.weight.copy_(inflate_kernel(conv2d.weight, 3, "average"))
    torch.testing.assert_close(conv3d(still), per_frame[:, :, :1].expand(-1, -1, 4, -1, -1))


def test_inflation_from_a_2d_checkpoint(vae, tmp_path):
    image_state = {k: (v[:, :, 0] if v.ndim == 5 else v) + 1.0 for k, v in vae.state_dict().items()
                   if "wavelet" not in k}
    torch.save({"state_dict": image_state}, tmp_path / "image.ckpt")
    model = WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae"))
    assert inflate_from_checkpoint(model, tmp_path / "image.ckpt") == len(image_state)
    weight = model.state_dict()["decoder.conv_in.conv.weight"]
    torch.testing.assert_close(weight[:, :, -1], image_state["decoder.conv_in.conv.weight"])
    assert not weight[:, :, :-1].any()
    torch.save({"state_dict": {**image_state, "decoder.extra": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointKeyError, match="decoder.extra"):
        inflate_from_checkpoint(model, tmp_path / "bad.ckpt")


def _backbone_file(path, lin: bool = True):
    from safetensors.torch import save_file

    state, width = {}, 3
    for k, indices in enumerate(conv_indices()):
        for i in indices:
            state[f"features.{i}.weight"] = torch.randn(4, width, 3, 3) * 0.3
            state[f"features.{i}.bias"] = torch.zeros(4)
            width = 4
        if lin:
            state[f"lin{k}.model.1.weight"] = torch.rand(1, 4, 1, 1)
    save_file(state, str(path))
    return path


def test_perceptual_distance_from_a_local_backbone_file(tmp_path):
    loss = PerceptualLoss(_backbone_file(tmp_path / "vgg.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert torch.equal(loss(x, x), torch.zeros(2))
    d = loss(x, y)
    assert (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(CheckpointKeyError, match="lin0"):
        PerceptualLoss(_backbone_file(tmp_path / "nolin.safetensors", lin=False))


def test_discriminator_scores_each_sample_on_its_own():
    disc = PatchDiscriminator3D(channels=4, layers=2)
    video = torch.randn(2, 3, 9, 32, 32)
    both = disc(video)
    torch.testing.assert_close(both[1:], disc(video[1:]))
    assert both.shape[:2] == (2, 1) and both.shape[2] < 9


def test_released_export_loads_strictly_and_prefers_the_ema(vae, tmp_path):
    ema = {n: p.detach() + 1.0 for n, p in vae.named_parameters() if p.requires_grad}
    save_released_checkpoint(tmp_path / "merged.ckpt", vae.state_dict(), ema, step=7)
    model = WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae"))
    assert load_wfvae_checkpoint(model, tmp_path / "merged.ckpt").source == "ema_state_dict"
    for name, value in ema.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


@pytest.mark.parametrize("change, key", [
    ({"loss": {"kl_weight": -1}}, "loss.kl_weight"),
    ({"loss": {"reconstruction": "l3"}}, "loss.reconstruction"),
    ({"train_autoencoder": False}, "train_autoencoder"),
    ({"inflate_from": "a.ckpt", "ae": {**tiny_ae_config_dict(), "from_pretrained": "b.ckpt"}}, "inflate_from"),
])
def test_bad_training_config_names_the_key(tmp_path, change, key):
    from mindspeed_mm_osp.config.vae_training import load_vae_training_config

    path = tmp_path / "vae.json"
    path.write_text(json.dumps({"train_autoencoder": True, "ae": tiny_ae_config_dict(), **change}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_vae_training_config(path)


def test_pretrain_refuses_tensor_parallel_vae_training(tmp_path, monkeypatch, capsys):
    from mindspeed_mm_osp.training.cli import main

    path = tmp_path / "vae.json"
    path.write_text(json.dumps({"train_autoencoder": True, "ae": tiny_ae_config_dict()}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(["--mm-model", str(path), "--mm-data", str(tmp_path / "data.json"), "--tensor-model-parallel-size",
              "2", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensor-model-parallel-size 2" in err[0] and "data-parallel only" in err[0]


def test_tiny_released_file_is_the_export_layout(tmp_path):
    from mindspeed_mm_osp.models.ae import write_tiny_wfvae

    ckpt = torch.load(write_tiny_wfvae(tmp_path), weights_only=True)
    assert set(ckpt) == {"epoch", "current_step", "state_dict", "ema_state_dict"}
    assert all(k.startswith("module.") for k in ckpt["ema_state_dict"])
