"""Feature cache: training from it equals online encoding; resume skips finished shards; mismatches are refused."""

import dataclasses
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from mindspeed_mm_osp.config import load_data_config, load_model_config
from mindspeed_mm_osp.data import LatentBatch, TextFeatures, build_train_dataloader
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler
from mindspeed_mm_osp.features import CacheMismatchError, FeatureCache, build_cached_dataloader, extract_features
from mindspeed_mm_osp.features.format import caption_key
from mindspeed_mm_osp.testing import make_tiny_setup
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.training.components import FrozenEncoders, Precision
from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict, make_synthetic_dataset
from mindspeed_mm_osp.training.step import encode_batch, flow_matching_loss, keyed_generator

from helpers import json_set

SEED = 7
FP32 = Precision(vae=torch.float32, text=torch.float32, predictor=torch.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = make_tiny_setup(tmp_path_factory.mktemp("features"))
    extract_features(load_data_config(s.data_json), load_model_config(s.model_json), s.cache_dir, shard_size=4,
                     batch_size=2, progress=False)
    return s


def _cached_model_config(model_cfg, video=True, text=True):
    return dataclasses.replace(model_cfg, load_video_features=video, load_text_features=text)


def _loader_args(**over):
    return {**dict(dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=2, consumed_samples=0, seed=SEED,
                   num_epochs=2), **over}


def test_cache_contents(setup):
    cache = FeatureCache(setup.cache_dir)
    assert len(cache.samples) == 16 and list(cache.failed.values())[0]["reason"] == "missing"
    assert {tuple(r["shape"]) for r in cache.samples.values()} == {(17, 64, 128), (1, 64, 128)}
    assert caption_key("") in cache.texts
    assert any(r["length"] < cache.text["max_length"] for r in cache.texts.values())  # valid tokens only
    sid = next(s for s, r in cache.samples.items() if r["shape"][0] == 17)
    f = cache.latents(sid)
    assert f["latent_mean"].shape == (4, 3, 8, 16) and f["latent_mask"].shape == (3, 8, 16)


@pytest.mark.parametrize("video,text", [(True, True), (True, False), (False, True)])
def test_training_step_from_cache_equals_online(setup, video, text):
    """Every micro-batch of two epochs (latents and text cached; one cached, the other online):
    same samples, CFG drops, retries, latents, text and loss."""
    data_cfg, model_cfg = load_data_config(setup.data_json), load_model_config(setup.model_json)
    toks = AutoTokenizer.from_pretrained(model_cfg.text_encoder.from_pretrained), \
        AutoTokenizer.from_pretrained(model_cfg.text_encoder_2.from_pretrained)
    epochs = 2 if video and text else 1
    online, online_stats = build_train_dataloader(data_cfg, tokenizer=toks[0], tokenizer_2=toks[1],
                                                  **_loader_args(num_epochs=epochs))
    cached_cfg = _cached_model_config(model_cfg, video, text)
    cached, cached_stats = build_cached_dataloader(data_cfg, cached_cfg, tokenizer=toks[0], tokenizer_2=toks[1],
                                                   **_loader_args(num_epochs=epochs))
    encoders = FrozenEncoders(model_cfg, FP32)
    cached_encoders = FrozenEncoders(cached_cfg, FP32)
    torch.manual_seed(0)
    predictor = SparseUMMDiT(model_cfg.predictor).eval()
    scheduler = FlowMatchingScheduler(model_cfg.diffusion)
    frames, n = set(), 0
    for ordinal, (a, b) in enumerate(zip(online, cached, strict=True)):
        assert isinstance(b, LatentBatch) == video and isinstance(b.text, TextFeatures) == text
        enc_a = encode_batch(encoders, a, keyed_generator(SEED, "vae", ordinal, 0, 0))
        enc_b = encode_batch(cached_encoders, b, keyed_generator(SEED, "vae", ordinal, 0, 0))
        torch.testing.assert_close(enc_b.latents, enc_a.latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc_b.latent_mask, enc_a.latent_mask, rtol=0, atol=0)
        torch.testing.assert_close(enc_b.text_mask, enc_a.text_mask, rtol=0, atol=0)
        valid = enc_a.text_mask.bool()
        torch.testing.assert_close(enc_b.text[valid], enc_a.text[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc_b.pooled, enc_a.pooled, rtol=1e-5, atol=1e-5)
        loss_a = flow_matching_loss(predictor, scheduler, enc_a, keyed_generator(SEED, "noise", ordinal, 0),
                                    torch.float32)
        loss_b = flow_matching_loss(predictor, scheduler, enc_b, keyed_generator(SEED, "noise", ordinal, 0),
                                    torch.float32)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        frames.add(a.video.shape[2])
        n += 1
    assert n == 8 * epochs and frames == {1, 17}  # video and image micro-batches
    failures = sum(online_stats.read_failures.values())
    assert sum(cached_stats.read_failures.values()) == failures and (failures > 0 or epochs == 1)


@pytest.fixture(scope="module")
def synthetic_cache(setup, tmp_path_factory):
    """The synthetic dataset (clips longer than 17 frames: a random window per read), cfg=0.5."""
    root = tmp_path_factory.mktemp("synthetic")
    synth = make_synthetic_dataset(root / "data", num_videos=6, num_images=4)
    data = data_json_dict(synth.data_txt, cfg=0.5)
    tiny = json.loads(setup.data_json.read_text())["dataset_param"]
    for key in ("tokenizer_config", "tokenizer_config_2"):
        data["dataset_param"][key] = tiny[key]
    data["dataset_param"]["feature_cache_dir"] = str(root / "cache")
    (root / "data.json").write_text(json.dumps(data))
    data_cfg, model_cfg = load_data_config(root / "data.json"), load_model_config(setup.model_json)
    extract_features(data_cfg, model_cfg, root / "cache", shard_size=16, batch_size=4, progress=False)
    return data_cfg, model_cfg


def test_cfg_drops_follow_the_online_rng(synthetic_cache):
    """With cfg=0.5 some captions are dropped; the cached loader drops exactly the online ones, also for
    clips whose online read draws a random window first (the cached read draws it too, unused)."""
    data_cfg, model_cfg = synthetic_cache
    tok = AutoTokenizer.from_pretrained(model_cfg.text_encoder.from_pretrained)
    empty_len = int(tok("", return_tensors="pt")["attention_mask"].sum())
    args = _loader_args(num_epochs=3, micro_batch_size=1, global_batch_size=1)
    online, _ = build_train_dataloader(data_cfg, tokenizer=tok, tokenizer_2=None, **args)
    cached, _ = build_cached_dataloader(data_cfg, _cached_model_config(model_cfg), tokenizer=None, tokenizer_2=None,
                                        **args)
    drops_a = [(a.text.attention_mask[:, 0].sum(1) == empty_len).tolist() for a in online]
    drops_b = [(b.text.mask.sum(1) == empty_len).tolist() for b in cached]
    assert drops_a == drops_b and 0 < sum(map(sum, drops_a)) < 2 * len(drops_a)


def test_resume_after_interruption_skips_finished_shards(setup, tmp_path):
    data_cfg, model_cfg = load_data_config(setup.data_json), load_model_config(setup.model_json)
    out = tmp_path / "cache"
    first = extract_features(data_cfg, model_cfg, out, shard_size=4, batch_size=2, stop_after_shards=2,
                             progress=False)
    assert first.computed == [0, 1] and not first.complete and not (out / "index.json").exists()
    mtimes = {k: os.stat(out / f"shard-{k:05d}.safetensors").st_mtime_ns for k in first.computed}
    second = extract_features(data_cfg, model_cfg, out, shard_size=4, batch_size=2, progress=False)
    assert second.reused == [0, 1] and second.computed == [2, 3, 4] and second.complete
    assert {k: os.stat(out / f"shard-{k:05d}.safetensors").st_mtime_ns for k in first.computed} == mtimes
    # A corrupted shard fails its checksum and is recomputed; the others are kept.
    with open(out / "shard-00003.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    third = extract_features(data_cfg, model_cfg, out, shard_size=4, batch_size=2, progress=False)
    assert third.computed == [3] and third.reused == [0, 1, 2, 4]
    assert json.loads((out / "index.json").read_text())["samples"] == \
        json.loads((setup.cache_dir / "index.json").read_text())["samples"]


@pytest.mark.parametrize("section,key,value,named", [
    ("model", ("ae", "scale"), [1.0, 1.0, 1.0, 1.0], "vae.scale"),
    ("model", ("text_encoder", "from_pretrained"), "/other/t5", "text.t5"),
    ("data", ("dataset_param", "model_max_length"), 16, "text.model_max_length"),
    ("data", ("dataset_param", "preprocess_parameters", "too_long_factor"), 4.0,
     "preprocess_parameters.too_long_factor"),
])
def test_mismatched_cache_is_refused(setup, tmp_path, section, key, value, named):
    paths = {"model": setup.model_json, "data": setup.data_json}
    cfg = json.loads(paths[section].read_text())
    json_set(cfg, key, value)
    changed = tmp_path / f"{section}.json"
    changed.write_text(json.dumps(cfg))
    data_cfg = load_data_config(changed if section == "data" else setup.data_json)
    model_cfg = load_model_config(changed if section == "model" else setup.model_json)
    with pytest.raises(CacheMismatchError, match=named.replace(".", r"\.")):
        build_cached_dataloader(data_cfg, _cached_model_config(model_cfg), tokenizer=None, tokenizer_2=None,
                                **_loader_args())


def test_samples_missing_from_cache_are_refused(setup, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    meta = json.loads((setup.cache_dir / "index.json").read_text())
    meta["samples"].pop(next(iter(meta["samples"])))
    (cache / "index.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="has no sample"):
        build_cached_dataloader(load_data_config(setup.data_json),
                                _cached_model_config(load_model_config(setup.model_json)), tokenizer=None,
                                tokenizer_2=None, cache_dir=cache, **_loader_args())
