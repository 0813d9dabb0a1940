"""Transforms: exact crop offsets and sizes (docs/data.md), ranges, multi-res plan == filter bucket; collate."""

import pytest
import torch

from mindspeed_mm_osp.config.data import CollateParam
from mindspeed_mm_osp.data import GroupLengthCollate, PixelBatch
from mindspeed_mm_osp.data.geometry import center_crop_box, multires_bucket
from mindspeed_mm_osp.data.transforms import (CenterCropResizeVideo, MaxHWStrideResizeVideo, SpatialStrideCropVideo,
                                              ToTensorVideo, ae_norm)


@pytest.mark.parametrize("src,target,box", [
    ((1083, 1920), (576, 1024), (2, 0, 1080, 1920)),  # 3-px excess -> offset 2 (half to even)
    ((128, 256), (576, 1024), (0, 14, 128, 227)),  # 29-px excess -> offset 14
    ((1080, 1440), (576, 1024), (135, 0, 810, 1440)),
    ((1088, 1920), (576, 1024), (4, 0, 1080, 1920)),
    ((1024, 1024), (576, 1024), (224, 0, 576, 1024)),
    ((1080, 2560), (576, 1024), (0, 320, 1080, 1920)),
    ((96, 128), (64, 128), (16, 0, 64, 128)),
    ((128, 128), (64, 128), (32, 0, 64, 128)),
])
def test_center_crop_boxes(src, target, box):
    assert tuple(center_crop_box(*src, *target)) == box


def test_center_crop_resize_output_and_range():
    x = torch.randint(0, 256, (3, 3, 96, 128), dtype=torch.uint8)
    y = ae_norm(CenterCropResizeVideo((64, 128), interpolation_mode="bicubic")(ToTensorVideo()(x)))
    assert y.shape == (3, 3, 64, 128) and y.dtype == torch.float32
    # Identity (up to float error) when the input already has the target size.
    z = CenterCropResizeVideo((64, 128), interpolation_mode="bicubic")(ToTensorVideo()(x[..., 16:80, :]))
    assert torch.allclose(z, x[..., 16:80, :].float() / 255, atol=1e-5)
    flat = ae_norm(ToTensorVideo()(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)))
    assert torch.equal(flat, torch.ones_like(flat))
    with pytest.raises(TypeError):
        ToTensorVideo()(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("five", [True, False])
@pytest.mark.parametrize("src", [(288, 512), (240, 320), (300, 300), (200, 300), (333, 1000), (720, 1280)])
@pytest.mark.parametrize("stride", [16, 32])
def test_multires_pair_matches_filter_bucket(five, src, stride):
    x = torch.rand(1, 3, *src)
    y = SpatialStrideCropVideo(stride, five)(MaxHWStrideResizeVideo(65536, five, stride, "bicubic")(x))
    assert tuple(y.shape[-2:]) == multires_bucket(*src, 65536, five, stride)


def test_collate_shapes_mask_and_padding():
    collate = GroupLengthCollate(CollateParam(num_frames=17))
    item = lambda t, h, w: {"video": torch.zeros(3, t, h, w), "input_ids": torch.ones(1, 8, dtype=torch.long),
                            "attention_mask": torch.ones(1, 8, dtype=torch.long), "read_failures": {"missing": 1}}
    b = collate([item(17, 64, 128), item(17, 64, 128)])
    assert type(b) is PixelBatch and b.video.shape == (2, 3, 17, 64, 128) and b.latent_mask.shape == (2, 3, 8, 16)
    assert b.latent_mask.all() and b.text.input_ids.shape == (2, 1, 8) and b.read_failures == {"missing": 2}
    assert b.text.input_ids_2 is None
    img = collate([item(1, 64, 128)])
    assert img.video.shape == (1, 3, 1, 64, 128) and img.latent_mask.shape == (1, 1, 8, 16)
    # A misaligned shape is padded and masked on the VAE latent grid.
    pad = collate([item(1, 72, 128)])
    assert pad.video.shape == (1, 3, 1, 80, 128)
    assert pad.latent_mask.shape == (1, 1, 10, 16) and pad.latent_mask.sum() == 9 * 16
    with pytest.raises(ValueError, match="one shape"):
        collate([item(17, 64, 128), item(1, 64, 128)])
