"""Image-to-video data: mask types, per-sample keyed drawing, loader determinism and exact resume, one VAE call."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mindspeed_mm_osp.config import ConfigError, from_dict, load_data_config
from mindspeed_mm_osp.config.data import MaskConfig
from mindspeed_mm_osp.data import I2VBatch, PixelBatch, build_train_dataloader
from mindspeed_mm_osp.data.masks import MaskDrawer, frame_mask
from mindspeed_mm_osp.models.text.tiny import write_tiny_clip, write_tiny_t5
from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict, make_synthetic_dataset


def test_mask_types():
    rng = np.random.default_rng(0)
    assert frame_mask("t2iv", 5, rng).tolist() == [1, 1, 1, 1, 1]
    assert frame_mask("clear", 5, rng).tolist() == [0, 0, 0, 0, 0]
    assert frame_mask("i2v", 5, rng).tolist() == [0, 1, 1, 1, 1]
    assert frame_mask("transition", 5, rng).tolist() == [0, 1, 1, 1, 0]
    for _ in range(20):  # continuation: a prefix of k in [floor(0.2*10), ceil(0.5*10)] = [2, 5] frames
        m = frame_mask("continuation", 10, rng, min_clear_ratio=0.2, max_clear_ratio=0.5)
        k = int((m == 0).sum())
        assert 2 <= k <= 5 and m[:k].sum() == 0 and bool((m[k:] == 1).all())
        r = frame_mask("random_temporal", 10, rng, min_clear_ratio=0.2, max_clear_ratio=0.5)
        assert 2 <= int((r == 0).sum()) <= 5
    with pytest.raises(ValueError, match="unknown mask type"):
        frame_mask("random_spatial", 5, rng)


def test_drawing_is_keyed_and_follows_the_weights():
    cfg = MaskConfig(mask_type_ratio_dict_video={"i2v": 3.0, "t2iv": 1.0, "transition": 0.0})
    reordered = MaskConfig(mask_type_ratio_dict_video={"transition": 0.0, "t2iv": 1.0, "i2v": 3.0})
    draws = [MaskDrawer(cfg)(17, np.random.default_rng((7, 0, s)))[0] for s in range(2000)]
    again = [MaskDrawer(reordered)(17, np.random.default_rng((7, 0, s)))[0] for s in range(2000)]
    assert draws == again  # the same key gives the same draw, whatever the JSON's key order
    assert "transition" not in draws and abs(draws.count("i2v") / 2000 - 0.75) < 0.04
    assert {MaskDrawer(cfg)(1, np.random.default_rng(s))[0] for s in range(50)} == {"t2iv"}  # images: image table


@pytest.mark.parametrize("block, key, words", [
    ({"mask_type_ratio_dict_video": {"i2v": 1, "random_spatial": 1}}, "mask_type_ratio_dict_video.random_spatial",
     "unknown mask type"),
    ({"mask_type_ratio_dict_video": {"i2v": -1}}, "mask_type_ratio_dict_video.i2v", ">= 0"),
    ({"mask_type_ratio_dict_video": {"i2v": 0}}, "mask_type_ratio_dict_video", "at least one weight"),
    ({"mask_type_ratio_dict_image": {"i2v": 1}}, "mask_type_ratio_dict_image.i2v", "['t2iv', 'clear']"),
    ({"min_clear_ratio": 0.6, "max_clear_ratio": 0.5}, "min_clear_ratio", "min_clear_ratio <= max_clear_ratio"),
])
def test_mask_config_errors_name_the_key(block, key, words):
    with pytest.raises(ConfigError) as err:
        from_dict(MaskConfig, block, file="data.json", path="dataset_param.mask_config")
    assert err.value.json_path == f"dataset_param.mask_config.{key}" and words in str(err.value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2vdata")
    synth = make_synthetic_dataset(root / "synth", num_videos=0, num_images=0)
    data = data_json_dict(synth.data_txt)
    data["dataset_param"]["mask_config"] = {"mask_type_ratio_dict_video": {"i2v": 1, "continuation": 1, "t2iv": 1}}
    (root / "data.json").write_text(json.dumps(data))
    tokenizers = (AutoTokenizer.from_pretrained(str(write_tiny_t5(root / "t5"))),
                  AutoTokenizer.from_pretrained(str(write_tiny_clip(root / "clip"))))
    return load_data_config(root / "data.json"), tokenizers


def _batches(cfg, tokenizers, **kw):
    args = dict(tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], dp_rank=0, dp_size=1, micro_batch_size=1,
                global_batch_size=2, consumed_samples=0, seed=11, num_workers=0)
    args.update(kw)
    return list(build_train_dataloader(cfg, **args)[0])


def test_loader_frame_masks_resume_exactly(setup):
    cfg, tokenizers = setup
    full = _batches(cfg, tokenizers)
    assert all(type(b) is I2VBatch and b.frame_mask.shape == (1, b.video.shape[2]) for b in full)
    videos = [b.frame_mask[0] for b in full if b.video.shape[2] > 1]
    assert len({tuple(m.tolist()) for m in videos}) > 1  # several mask types and prefixes drawn
    resumed = _batches(cfg, tokenizers, consumed_samples=3 * 2)
    assert [b.frame_mask.tolist() for b in resumed] == [b.frame_mask.tolist() for b in full[6:]]
    # the draw comes after the frames and the caption: the clips are those of text-to-video training
    plain = _batches(dataclasses.replace(cfg, dataset_param=dataclasses.replace(cfg.dataset_param, mask_config=None)),
                     tokenizers)
    assert all(type(a) is PixelBatch and torch.equal(a.video, b.video)
               and torch.equal(a.text.input_ids, b.text.input_ids) for a, b in zip(plain, full))


def test_clip_and_masked_clip_share_one_vae_call_and_the_causal_first_frame(tmp_path):
    """`encode_batch`: the clip's latents are those of text-to-video encoding (same generator), and every latent
    frame made only of given frames is the clip's own (the causal VAE encodes frame 0 alone)."""
    from mindspeed_mm_osp.config import AEConfig
    from mindspeed_mm_osp.models.ae import VideoAutoencoder, tiny_ae_config_dict, write_tiny_wfvae
    from mindspeed_mm_osp.training.step import _encode_with_condition, keyed_generator

    ckpt = write_tiny_wfvae(tmp_path, seed=0)
    vae = VideoAutoencoder(from_dict(AEConfig, {**tiny_ae_config_dict(), "from_pretrained": str(ckpt)}))
    video = torch.rand(2, 3, 17, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.ones(2, 17)
    mask[0, 0] = 0          # i2v
    mask[1, :9] = 0         # continuation of 9 frames: latent frames 0 and 1 given
    latents, condition, latent_mask = _encode_with_condition(vae, video, mask, keyed_generator(1))
    torch.testing.assert_close(latents, vae.encode(video, generator=keyed_generator(1)).float(), rtol=0, atol=0)
    assert latent_mask.shape == (2, 8, 3, 2, 2)
    mean, _ = vae.encode_posterior(video)
    torch.testing.assert_close(vae.encode_posterior(video[:, :, :1])[0], mean[:, :, :1], rtol=0, atol=1e-6)
    cond_mean, _ = vae.encode_posterior(torch.where(mask[:, None, :, None, None] > 0.5, -1.0, video))
    torch.testing.assert_close(cond_mean[0, :, 0], mean[0, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond_mean[1, :, :2], mean[1, :, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(cond_mean[0, :, 1], mean[0, :, 1], atol=1e-3)
    torch.testing.assert_close(condition, vae.sample_latents(cond_mean, vae.encode_posterior(
        torch.where(mask[:, None, :, None, None] > 0.5, -1.0, video))[1], _after(vae, video)).float())


def _after(vae, video):
    """The generator state after the clip's posterior sample: the masked clip's sample comes next."""
    from mindspeed_mm_osp.training.step import keyed_generator

    gen = keyed_generator(1)
    vae.encode(video, generator=gen)
    return gen


def test_i2v_launcher_and_release_configs(tmp_path):
    from helpers import launcher_argv

    from mindspeed_mm_osp.config import load_model_config, validate_conditioning
    from mindspeed_mm_osp.training.arguments import parse_args

    argv = launcher_argv(tmp_path, "examples/opensoraplan1.5/pretrain_i2v_opensoraplan1_5.sh")
    args = parse_args(argv, world_size=16)
    assert args.i2v_loss_region == "all" and args.tensor_model_parallel_size == 8 and args.sequence_parallel
    model, data = load_model_config(args.mm_model), load_data_config(args.mm_data)
    assert model.predictor.patch_embed_channels == 2 * 32 + 8 and model.predictor.from_pretrained.endswith(".pt")
    assert data.dataset_param.mask_config.mask_type_ratio_dict_video["i2v"] == 8
    validate_conditioning(model, data, model_file=args.mm_model, data_file=args.mm_data)


def test_encoded_batch_with_condition_round_trips_through_its_tensor_list():
    """Encoder DP all-gathers `EncodedBatch.tensors()`: the condition must survive the trip."""
    from mindspeed_mm_osp.training.step import EncodedBatch

    enc = EncodedBatch(torch.randn(1, 4, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.randn(1, 3, 8), torch.ones(1, 3),
                       None, torch.randn(1, 4, 2, 2, 2), torch.ones(1, 8, 2, 2, 2))
    back = EncodedBatch.from_tensors(enc.tensors())
    assert back.pooled is None and torch.equal(back.condition_latents, enc.condition_latents)
    assert torch.equal(back.condition_mask, enc.condition_mask)
    plain = EncodedBatch.from_tensors(EncodedBatch(*enc.tensors()[:4], None).tensors())
    assert plain.condition_latents is None and plain.condition_mask is None
    generated = enc.loss_mask("generated")
    assert torch.equal(generated, enc.latent_mask) and torch.equal(enc.loss_mask("all"), enc.latent_mask)
    enc.condition_mask[:, :, 0] = 0  # latent frame 0 given
    assert enc.loss_mask("generated")[:, 0].sum() == 0 and enc.loss_mask("generated")[:, 1].all()
