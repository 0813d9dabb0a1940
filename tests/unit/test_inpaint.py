"""Image-to-video (inpaint) variant of SparseUMMDiT: latent-mask rule, input layout, T2V -> I2V weight load."""

import pytest
import torch

from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.predictor import (
    SparseUMMDiT,
    compress_mask,
    generated_latent_frames,
    given_latent_frames,
    inpaint_input,
    load_merged_state_dict,
    local_state_dict,
    masked_video,
)
from mindspeed_mm_osp.testing import TINY_PREDICTOR, perturb_parameters, tiny_predictor_config

TINY = dict(TINY_PREDICTOR, num_heads=2, timestep_embed_dim=16, caption_channels=8, pooled_projection_dim=8)


def config(**overrides) -> PredictorConfig:
    return tiny_predictor_config(TINY, **overrides)


def test_channel_count_is_two_latents_plus_the_temporal_factor():
    cfg = config(model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8)
    assert (cfg.patch_embed_channels, cfg.output_channels) == (2 * 4 + 8, 4)
    assert config().patch_embed_channels == 4


def test_mask_compression_folds_pixel_frames_into_channels_with_the_causal_first_frame():
    frames = torch.arange(9.0)[None]  # pixel frame index as the "mask" value, 9 = 1 + 2*4 frames
    latent = compress_mask(frames, 4, 2, 3)
    assert latent.shape == (1, 4, 3, 2, 3)
    assert latent[0, :, 0, 0, 0].tolist() == [0, 0, 0, 0]   # frame 0 alone, repeated
    assert latent[0, :, 1, 0, 0].tolist() == [1, 2, 3, 4]
    assert latent[0, :, 2, 1, 2].tolist() == [5, 6, 7, 8]
    i2v = torch.ones(1, 9)
    i2v[0, 0] = 0
    assert given_latent_frames(compress_mask(i2v, 4, 1, 1)).flatten().tolist() == [True, False, False]
    transition = i2v.clone()
    transition[0, -1] = 0  # the last latent frame is only partly given: still generated
    assert generated_latent_frames(compress_mask(transition, 4, 1, 1)).flatten().tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="1 mod 4"):
        compress_mask(torch.ones(1, 8), 4, 1, 1)


def test_masked_video_blacks_out_generated_frames():
    video = torch.rand(1, 3, 5, 2, 2) * 2 - 1
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    out = masked_video(video, mask)
    assert torch.equal(out[:, :, [0, 4]], video[:, :, [0, 4]])
    assert bool((out[:, :, 1:4] == -1).all())


def _inputs(cin, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 3, 4, 4, generator=g)
    return x, torch.tensor([10.0, 700.0]), torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, generator=g)


def test_t2v_weights_make_the_inpaint_model_equal_the_t2v_model():
    torch.manual_seed(0)
    t2v = SparseUMMDiT(config()).eval()
    perturb_parameters(t2v)
    cfg = config(model_id="SparseUMMDiTInpaint", vae_scale_factor_t=2)
    i2v = SparseUMMDiT(cfg).eval()
    load_merged_state_dict(i2v, local_state_dict(t2v))
    weight = i2v.patch_embed.proj.weight
    assert weight.shape[1] == 2 * 4 + 2
    assert torch.equal(weight[:, :4], t2v.patch_embed.proj.weight) and not weight[:, 4:].any()

    noisy, timestep, text, pooled = _inputs(4)
    with torch.no_grad():
        expected = t2v(noisy, timestep, text, pooled_projections=pooled)
        zero = i2v(inpaint_input(noisy, torch.zeros_like(noisy), torch.zeros(2, 2, 3, 4, 4)), timestep, text,
                   pooled_projections=pooled)
        frame_mask = torch.ones(2, 5)
        frame_mask[:, 0] = 0
        some = i2v(inpaint_input(noisy, torch.randn_like(noisy), compress_mask(frame_mask, 2, 4, 4)), timestep,
                   text, pooled_projections=pooled)
    torch.testing.assert_close(zero, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(some, expected, rtol=0, atol=1e-6)  # new channels are zero: the condition is unseen

    # once the new channels are trained, the condition changes the output
    with torch.no_grad():
        i2v.patch_embed.proj.weight[:, 4:].normal_(0, 0.1)
        assert not torch.allclose(i2v(inpaint_input(noisy, torch.randn_like(noisy), compress_mask(frame_mask, 2, 4, 4)),
                                      timestep, text, pooled_projections=pooled), expected, atol=1e-4)
    # an I2V checkpoint loads as is (no widening) and a T2V model refuses it with the shape named
    i2v_sd = local_state_dict(i2v)
    again = SparseUMMDiT(cfg).eval()
    load_merged_state_dict(again, i2v_sd)
    assert torch.equal(again.patch_embed.proj.weight, i2v.patch_embed.proj.weight)
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: checkpoint \(32, 10, 2, 2\)"):
        load_merged_state_dict(SparseUMMDiT(config()), i2v_sd)


def test_inpaint_model_names_the_expected_input_layout():
    model = SparseUMMDiT(config(model_id="SparseUMMDiTInpaint", vae_scale_factor_t=2)).eval()
    noisy, timestep, text, pooled = _inputs(4)
    with pytest.raises(ValueError, match="expects 10 input channels, got 4 .*inpaint_input"):
        model(noisy, timestep, text, pooled_projections=pooled)
