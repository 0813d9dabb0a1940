"""Typed batches (data/batch.py): the shape and dtype contract is enforced where a batch is built, the collates
build the right kind, and `pin_memory` keeps the kind and the values."""

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.config.data import CollateParam
from mindspeed_mm_osp.data import GroupLengthCollate, I2VBatch, LatentBatch, PixelBatch, TextFeatures, TokenIds


def _ids(b: int, length: int = 8) -> TokenIds:
    return TokenIds(input_ids=torch.zeros(b, 1, length, dtype=torch.int64),
                    attention_mask=torch.ones(b, 1, length, dtype=torch.int64))


def _pixels(b: int = 2, **over) -> dict:
    return {"video": torch.zeros(b, 3, 17, 16, 16), "latent_mask": torch.ones(b, 3, 2, 2), "text": _ids(b), **over}


def test_a_well_formed_batch_lists_its_tensors():
    batch = PixelBatch(**_pixels())
    assert set(batch.tensors()) == {"video", "latent_mask", "text.input_ids", "text.attention_mask"}
    assert batch.read_failures == {}


@pytest.mark.parametrize("over,message", [
    ({"latent_mask": torch.ones(3, 3, 2, 2)}, "PixelBatch.latent_mask: dimension B is 3, other tensors of the batch "
                                              "make it 2"),
    ({"text": _ids(3)}, "TokenIds.input_ids: dimension B is 3, other tensors of the batch make it 2"),
    ({"video": torch.zeros(2, 3, 17, 16, 16, dtype=torch.float64)}, "PixelBatch.video: expected dtype torch.float32"),
    ({"video": torch.zeros(2, 4, 17, 16, 16)}, "PixelBatch.video: a dimension is 4, the contract fixes it at 3"),
    ({"latent_mask": torch.ones(2, 2, 2)}, r"PixelBatch.latent_mask: expected a tensor of shape \(B, t, h, w\)"),
])
def test_a_batch_off_its_contract_is_refused_where_it_is_built(over, message):
    with pytest.raises(ValueError, match=message):
        PixelBatch(**_pixels(**over))


def test_optional_fields_and_the_kinds():
    with pytest.raises(ValueError, match="TokenIds.input_ids_2: a dimension is 76, the contract fixes it at 77"):
        dataclasses.replace(_ids(1), input_ids_2=torch.zeros(1, 1, 76, dtype=torch.int64))
    with pytest.raises(ValueError, match="TextFeatures.hidden: expected dtype floating point, got torch.int64"):
        TextFeatures(hidden=torch.zeros(1, 8, 4, dtype=torch.int64), mask=torch.ones(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="I2VBatch.frame_mask: dimension T is 9, other tensors of the batch make it"):
        I2VBatch(**_pixels(), frame_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="LatentBatch.shift: dimension Z is 8"):
        LatentBatch(mean=torch.zeros(1, 4, 3, 2, 2), logvar=torch.zeros(1, 4, 3, 2, 2),
                    latent_mask=torch.ones(1, 3, 2, 2), shift=torch.zeros(1, 8, 1, 1, 1),
                    scale=torch.ones(1, 4, 1, 1, 1), text=_ids(1))


def test_collate_builds_an_i2v_batch_with_padded_frames_generated():
    collate = GroupLengthCollate(CollateParam(num_frames=17))
    item = {"video": torch.zeros(3, 13, 64, 128), "input_ids": torch.ones(1, 8, dtype=torch.long),
            "attention_mask": torch.ones(1, 8, dtype=torch.long), "frame_mask": torch.tensor([0.0] + [1.0] * 12)}
    batch = collate([item])
    assert type(batch) is I2VBatch and batch.video.shape == (1, 3, 17, 64, 128)
    assert batch.frame_mask.tolist() == [[0.0] + [1.0] * 16]


@pytest.mark.gpu
def test_pin_memory_keeps_the_kind_and_the_values():
    batch = I2VBatch(**_pixels(read_failures={"missing": 1}), frame_mask=torch.rand(2, 17))
    pinned = batch.pin_memory()
    assert type(pinned) is I2VBatch and pinned.read_failures == {"missing": 1}
    assert all(t.is_pinned() and torch.equal(t, batch.tensors()[k]) for k, t in pinned.tensors().items())
