"""Dataset + loader on the synthetic set: frame indices, crops, retries, captions, workers, resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mindspeed_mm_osp.config import load_data_config
from mindspeed_mm_osp.data import (CaptionProcessor, PixelBatch, SampleKey, T2VDataset, build_index,
                                   build_index_from_config, build_train_dataloader, load_annotations,
                                   make_video_reader)
from mindspeed_mm_osp.data import frames as F
from mindspeed_mm_osp.models.text.tiny import write_tiny_clip, write_tiny_t5
from mindspeed_mm_osp.models.text.tokenizer import tokenize
from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict, decode_frame_index, make_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_videos=0, num_images=0)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return (AutoTokenizer.from_pretrained(str(write_tiny_t5(d / "t5"))),
            AutoTokenizer.from_pretrained(str(write_tiny_clip(d / "clip"))))


def _config(synth, tmp_path, **over):
    path = tmp_path / f"data_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(data_json_dict(synth.data_txt, **over)))
    return load_data_config(path)


@pytest.fixture(scope="module")
def dataset(synth, tokenizers):
    cfg = load_data_config(synth.data_json)
    index, _ = build_index_from_config(cfg, global_batch_size=1)
    ds = T2VDataset(index, cfg.dataset_param, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                    video_reader=make_video_reader("decoder"), seed=5)
    return ds


def _position(ds, name):
    return next(i for i, p in enumerate(ds.index.paths) if p.endswith(name))


@pytest.mark.parametrize("name", ["v24_40.mp4", "v30_40.mp4", "v23976_20.mp4", "v24_17.mp4", "v24_60.mp4",
                                  "v24_crop.mp4", "v_43_ok.mp4", "v_square.mp4"])
def test_decoded_frames_are_the_planned_indices(dataset, name):
    i = _position(dataset, name)
    preprocess = dataset.preprocess
    for seed in range(3):
        planned = dataset.index.frame_indices(i, preprocess, np.random.default_rng(seed))
        video = dataset.load_video(i, np.random.default_rng(seed))
        assert video.shape == (3, 17, 64, 128)
        assert [decode_frame_index(video[:, t].numpy()) for t in range(17)] == planned.tolist()
        cand = F.candidate_indices(int(dataset.index.start[i]), int(dataset.index.num_frames[i]),
                                   float(dataset.index.interval[i])).tolist()
        b = cand.index(int(planned[0]))
        assert planned.tolist() == cand[b:b + 17]  # consecutive resampled candidates
    if name == "v30_40.mp4":
        assert len(cand) == 32 and cand[:6] == [0, 1, 2, 3, 5, 6]
    if name == "v24_60.mp4":
        assert min(cand) == 30 and max(cand) == 59
    if name == "v24_17.mp4":
        assert planned.tolist() == list(range(17))
    if name == "v24_crop.mp4":
        v = dataset.load_video(i, np.random.default_rng(0))
        # A leaked red row would give R - G near 2 (about 1 after the 2x antialiased downscale);
        # 4:2:0 chroma upsampling alone bleeds about 0.3 into the edge rows.
        assert (v[0] - v[1]).max() < 0.5


@pytest.mark.parametrize("name,reason", [("corrupt.mp4", "corrupt"), ("missing.mp4", "missing"),
                                         ("empty.mp4", "empty"), ("v24_10.mp4", "short")])
def test_bad_files_are_replaced_by_same_shape_samples(dataset, name, reason):
    item = dataset[SampleKey(_position(dataset, name), 0, 3)]
    assert item["video"].shape == (3, 17, 64, 128)
    assert item["read_failures"].get(reason, 0) >= 1
    assert item["input_ids"].shape == (1, 32) and item["input_ids_2"].shape == (1, 77)


def test_retries_are_bounded(synth, tokenizers, tmp_path):
    cfg = load_data_config(synth.data_json)
    bad = [{"path": str(tmp_path / f"gone{k}.mp4"), "cap": "x", "resolution": {"height": 128, "width": 256},
            "num_frames": 40} for k in range(6)]
    index, _ = build_index(bad, cfg.dataset_param.preprocess_parameters, global_batch_size=1)
    ds = T2VDataset(index, cfg.dataset_param, tokenizer=tokenizers[0], tokenizer_2=None,
                    video_reader=make_video_reader("pyav"), seed=0)
    with pytest.raises(RuntimeError, match=r"after 5 attempts.*'missing': 5"):
        ds[SampleKey(0, 0, 0)]


def test_images_captions_and_cfg(dataset, tokenizers):
    i = _position(dataset, "i_gray.jpg")
    assert dataset.load_video(i, np.random.default_rng(0)).shape == (3, 1, 64, 128)
    i = _position(dataset, "i_png.png")
    v = dataset.load_video(i, np.random.default_rng(0))
    assert v.shape == (3, 1, 64, 128) and abs(float(v[:, 0, 32, 64].mean()) - (128 / 127.5 - 1)) < 0.02
    caps = ["a grey picture", "a picture with a blue border", "a flat grey image"]
    raw = CaptionProcessor(*tokenizers, max_length=32, cfg=0.1, clean=False)
    rng = np.random.default_rng(0)
    draws = [raw.choose(caps, rng) for _ in range(10000)]
    assert abs(draws.count("") / 10000 - 0.1) < 0.015
    assert set(draws) == set(caps) | {""}
    proc = CaptionProcessor(*tokenizers, max_length=32, cfg=0.1, clean=True)
    empty = proc("")
    assert torch.equal(empty["input_ids"], tokenize("", tokenizers[0], 32)[0])
    assert torch.equal(empty["input_ids_2"], tokenize("", tokenizers[1], 77)[0])
    assert empty["attention_mask"].sum() == 1  # T5: just </s>
    assert proc.choose("Visit https://example.com now", np.random.default_rng(1)) in ("visit now", "")


def test_a_caption_template_gives_the_text_the_sampler_encodes_for_that_prompt(synth, tokenizers, tmp_path):
    """`caption_template` (set by distillation): a training caption becomes exactly the text `inference.py` encodes
    for it as a prompt, through the data JSON into the dataset's tokens."""
    from mindspeed_mm_osp.inference.runner import prepare_texts

    caps = ["a grey picture", "Visit https://example.com now", "A <b>bold</b> square &amp; a disc"]
    proc = CaptionProcessor(*tokenizers, max_length=32, cfg=0.0, clean=True, template="v1.5")
    rng = np.random.default_rng(0)
    for cap in caps:
        text = proc.choose(cap, rng)
        assert text == prepare_texts([cap], None, "v1.5")[0][0] and text.startswith("high quality, ")
    data = data_json_dict(synth.data_txt)
    (tmp_path / "templated.json").write_text(json.dumps({**data, "dataset_param": {**data["dataset_param"],
                                                                                   "caption_template": "v1.5"}}))
    cfg, templated = load_data_config(synth.data_json), load_data_config(tmp_path / "templated.json")
    assert (cfg.dataset_param.caption_template, templated.dataset_param.caption_template) == (None, "v1.5")
    index, _ = build_index_from_config(templated, global_batch_size=1)
    position = next(i for i, c in enumerate(index.captions) if isinstance(c, str) and c)
    no_drop = {"preprocess_parameters": dataclasses.replace(templated.dataset_param.preprocess_parameters, cfg=0.0)}
    ids = [T2VDataset(index, dataclasses.replace(c.dataset_param, **no_drop), tokenizer=tokenizers[0],
                      tokenizer_2=tokenizers[1], video_reader=make_video_reader("decoder"),
                      seed=5)[SampleKey(position, 0, 0)]["input_ids"] for c in (cfg, templated)]
    expected = prepare_texts([index.captions[position]], None, "v1.5")[0][0]
    assert torch.equal(ids[1], tokenize(expected, tokenizers[0], 32)[0]) and not torch.equal(ids[0], ids[1])


def _batches(cfg, tokenizers, **kw):
    args = dict(tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], dp_rank=0, dp_size=1, micro_batch_size=2,
                global_batch_size=2, consumed_samples=0, seed=11, num_workers=0)
    args.update(kw)
    loader, stats = build_train_dataloader(cfg, **args)
    return list(loader), stats


def _same(a, b):
    def same(x, y):
        tx, ty = x.tensors(), y.tensors()
        return type(x) is type(y) and tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)

    return len(a) == len(b) and all(map(same, a, b))


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_loader_workers_and_failure_counters(synth, tokenizers, tmp_path, reader):
    cfg = _config(synth, tmp_path, video_reader_type=reader)
    b0, stats = _batches(cfg, tokenizers)
    b2, stats2 = _batches(cfg, tokenizers, num_workers=2)
    assert len(b0) == stats.steps_per_epoch == 10  # 12 videos / 2 + 8 images / 2
    assert _same(b0, b2)  # worker count does not change a single value
    for b in b0:
        assert type(b) is PixelBatch and set(b.tensors()) == {
            "video", "text.input_ids", "text.attention_mask", "text.input_ids_2", "text.attention_mask_2",
            "latent_mask"}
        assert b.video.dtype == torch.float32 and b.video.shape[:2] == (2, 3)
        assert b.text.input_ids.shape == (2, 1, 32) and b.text.input_ids_2.shape == (2, 1, 77)
        assert b.latent_mask.shape[0] == 2 and b.latent_mask.all()
        assert b.video.abs().max() < 1.2
    for r in ("corrupt", "missing", "empty", "short"):
        assert stats.read_failures[r] >= 1 and stats2.read_failures[r] >= 1


def test_resume_reproduces_the_uninterrupted_run(synth, tokenizers):
    cfg = load_data_config(synth.data_json)
    full, _ = _batches(cfg, tokenizers, micro_batch_size=1, global_batch_size=2)  # GA = 2
    resumed, _ = _batches(cfg, tokenizers, micro_batch_size=1, global_batch_size=2, consumed_samples=3 * 2)
    assert len(full) == 20 and _same(resumed, full[6:])


def test_tp_peers_identical_dp_ranks_differ(synth, tokenizers):
    cfg = load_data_config(synth.data_json)
    kw = dict(micro_batch_size=1, global_batch_size=2, dp_size=2)
    peer_a, _ = _batches(cfg, tokenizers, dp_rank=1, **kw)
    peer_b, _ = _batches(cfg, tokenizers, dp_rank=1, num_workers=2, **kw)
    other, _ = _batches(cfg, tokenizers, dp_rank=0, **kw)
    assert _same(peer_a, peer_b)
    assert [b.video.shape for b in peer_a] == [b.video.shape for b in other]
    assert not any(torch.equal(a.video, b.video) for a, b in zip(peer_a, other) if a.video.shape[2] > 1)


def test_use_img_from_vid_adds_one_frame_per_video(synth, tokenizers):
    cfg = load_data_config(synth.data_json)
    loaded = load_annotations(synth.data_txt)
    index, stats = build_index(loaded.records, cfg.dataset_param.preprocess_parameters, global_batch_size=1,
                               use_img_from_vid=True)
    assert stats.frames_from_videos == stats.videos_kept == 12 and stats.shapes[(1, 64, 128)] == 8 + 12
    ds = T2VDataset(index, cfg.dataset_param, tokenizer=tokenizers[0], tokenizer_2=None,
                    video_reader=make_video_reader("pyav"), seed=0)
    i = next(j for j in range(len(index)) if index.kind[j] == 2 and index.paths[j].endswith("v24_60.mp4"))
    frame = ds.load_video(i, np.random.default_rng(0))
    assert frame.shape == (3, 1, 64, 128) and 30 <= decode_frame_index(frame[:, 0].numpy()) <= 59


def test_plans_match_what_the_dataset_decodes(synth, dataset):
    from mindspeed_mm_osp.data import iter_plans, plan_rng

    for plan in list(iter_plans(dataset.index, dataset.preprocess, seed=9))[:8]:
        if not plan.path.endswith(("corrupt.mp4", "missing.mp4", "empty.mp4", "v24_10.mp4")):
            video = dataset.load_video(plan.position, plan_rng(9, plan.position))
            assert tuple(video.shape[1:]) == tuple(plan.shape)
            assert [decode_frame_index(video[:, t].numpy()) for t in range(plan.shape.frames)] == plan.frame_indices.tolist()
