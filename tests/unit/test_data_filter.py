"""Startup filter (docs/data.md) on the synthetic dataset's cases: every record's outcome, frame math, buckets."""

import json
import time

import numpy as np
import pytest

from mindspeed_mm_osp.config import ConfigError, load_data_config
from mindspeed_mm_osp.config.data import PreprocessParameters
from mindspeed_mm_osp.data import build_index, iter_annotation_plans, load_annotations, parse_data_txt
from mindspeed_mm_osp.data import frames as F
from mindspeed_mm_osp.data.geometry import force_resolution_min_area, multires_bucket
from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict, make_synthetic_dataset

# Expected outcome per case id in config A (V21 = zero-byte file, U1 = .txt).
KEPT_VIDEO = {"V1", "V2", "V5", "V6", "V10", "V11", "V15", "V17", "V18", "V19", "V20", "V21"}
KEPT_IMAGE = {"I1", "I2", "I5", "I6", "I7"}
DROPPED = {
    "V3": "too_short", "V4": "fps_too_low", "V7": "too_short", "V8": "below_min_num_frames", "V9": "too_long",
    "V12": "vid_aspect_mismatch", "V13": "vid_aspect_mismatch", "V14": "vid_res_too_small",
    "V16": "vid_res_too_small", "D1": "too_short", "N1": "no_cap", "N2": "no_cap", "N3": "no_resolution",
    "N4": "no_resolution", "N5": "no_resolution", "I3": "img_res_too_small", "I4": "img_aspect_mismatch",
    "U1": "unsupported_ext",
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_videos=0, num_images=0)


def _preprocess(**over) -> PreprocessParameters:
    from mindspeed_mm_osp.config import from_dict
    from mindspeed_mm_osp.tools.make_synthetic_dataset import CONFIG_A

    d = {k: v for k, v in CONFIG_A.items() if k != "train_pipeline"}
    return from_dict(PreprocessParameters, {**d, **over})


def _outcomes(records, stats, index):
    out = {}
    kept_shape = {int(r): str(index.shape(i)) for i, r in enumerate(index.record)}
    for pos, rec in enumerate(records):
        out.setdefault(rec["id"], set()).add(kept_shape.get(pos, stats.reason_of(pos)))
    return out


def test_data_txt_and_missing_fields(synth, tmp_path):
    entries = parse_data_txt(synth.data_txt)
    assert [e[0].rsplit("/", 1)[-1] for e in entries] == ["set1", "set2"]  # blank lines skipped
    loaded = load_annotations(synth.data_txt)
    assert loaded.malformed == 2  # a bare string and a record without path
    by_id = {r["id"]: r for r in loaded.records}
    assert "cap" not in by_id["N1"] and "cap" not in by_id["N2"]  # null and missing are both absent
    assert by_id["V1"]["path"] == str(synth.root / "set1" / "v24_40.mp4")
    # An absolute path in the JSON ignores the folder; NaN-free records stay NaN-free.
    anno = tmp_path / "a.json"
    anno.write_text(json.dumps([{"path": "/abs/x.mp4", "cap": "c"}, {"path": "rel.jpg", "cap": "d", "aes": None}]))
    (tmp_path / "d.txt").write_text(f"\n  /folder,{anno}  \n\n")
    recs = load_annotations(tmp_path / "d.txt").records
    assert [r["path"] for r in recs] == ["/abs/x.mp4", "/folder/rel.jpg"] and "aes" not in recs[1]


def test_config_a_every_record(synth):
    cfg = load_data_config(synth.data_json)
    loaded = load_annotations(synth.data_txt)
    index, stats = build_index(loaded.records, cfg.dataset_param.preprocess_parameters, global_batch_size=1,
                               malformed=loaded.malformed)
    got = _outcomes(loaded.records, stats, index)
    expected = {**{k: {"17x64x128"} for k in KEPT_VIDEO}, **{k: {"1x64x128"} for k in KEPT_IMAGE},
                **{k: {v} for k, v in DROPPED.items()}}
    assert got == expected
    c = stats.counters
    assert (c["too_short"], c["no_cap"], c["no_resolution"], c["filter_minority"], stats.malformed) == (4, 2, 3, 0, 2)
    assert stats.shapes == {(17, 64, 128): 12, (1, 64, 128): 8}
    assert "17x64x128" in stats.table() and "too_short" in stats.table()


def test_config_a_prime_short_clips_and_minority(synth):
    loaded = load_annotations(synth.data_txt)
    preprocess = _preprocess(drop_short_ratio=0.0)
    index, stats = build_index(loaded.records, preprocess, global_batch_size=1)
    got = _outcomes(loaded.records, stats, index)
    for k in ("V3", "V7", "D1"):
        assert got[k] == {"9x64x128"}
    assert got["V8"] == {"below_min_num_frames"}
    # Without one D1 the 9-frame bucket has 3 < 4 members and is removed.
    records = [r for i, r in enumerate(loaded.records) if i != max(j for j, r in enumerate(loaded.records) if r["id"] == "D1")]
    index, stats = build_index(records, preprocess, global_batch_size=1)
    assert stats.counters["filter_minority"] == 3
    assert all(s.frames != 9 for s in index.shapes)


def test_nothing_survives_is_a_clean_error():
    with pytest.raises(ValueError, match="no annotation record survived"):
        build_index([{"path": "a.jpg", "cap": "x", "resolution": {"height": 8, "width": 8}}], _preprocess(),
                    global_batch_size=1)


@pytest.mark.parametrize("src,ratio_ok,passes", [
    ((1080, 1920), True, True), ((720, 1280), True, True), ((576, 1024), True, True), ((540, 960), True, False),
    ((1080, 1440), True, True), ((720, 960), True, False), ((768, 1024), True, True), ((1024, 1024), True, True),
    ((1080, 2560), True, True), ((800, 2000), False, None), ((1920, 1080), False, None)])
def test_force_resolution_v15_table(src, ratio_ok, passes):
    h, w = src
    assert (0.42 <= h / w <= 1.0) == ratio_ok
    if ratio_ok:
        ok = h * w >= 589824 and h * w >= force_resolution_min_area(h, w, 576, 1024, 589824)
        assert ok == passes


@pytest.mark.parametrize("src,five,plain", [
    ((288, 512), (144, 256), (192, 336)), ((240, 320), (192, 256), (208, 288)), ((300, 300), (256, 256), (256, 256)),
    ((320, 240), (256, 192), (288, 208)), ((512, 288), (256, 144), (336, 192)), ((200, 300), (192, 256), (192, 288)),
    ((720, 1280), (144, 256), (192, 336)), ((480, 640), (192, 256), (208, 288)), ((333, 1000), (144, 256), (144, 432))])
def test_multires_buckets(src, five, plain):
    assert multires_bucket(*src, 65536, True, 16) == five
    assert multires_bucket(*src, 65536, False, 16) == plain


def test_multires_index_counters_and_invariant():
    sizes = [(288, 512), (240, 320), (300, 300), (320, 240), (512, 288), (200, 300), (100, 150)]
    recs = [{"id": f"{h}x{w}", "path": f"{h}x{w}_{k}.png", "cap": "c", "resolution": {"height": h, "width": w}}
            for (h, w) in sizes for k in range(4 if (h, w) != (320, 240) else 3)]
    recs += [{"id": "vid", "path": f"v{k}.MP4", "cap": "c", "resolution": {"height": 288, "width": 512},
              "num_frames": 40, "fps": 24} for k in range(4)]
    preprocess = _preprocess(force_resolution=False, force_5_ratio=True, max_hxw=65536, min_hxw=None,
                             max_h_div_w_ratio=2.0, min_h_div_w_ratio=0.5)
    index, stats = build_index(recs, preprocess, global_batch_size=1)
    assert stats.counters["img_res_too_small"] == 4 and stats.counters["filter_minority"] == 3
    assert set(map(str, stats.shapes)) == {"1x144x256", "1x192x256", "1x256x256", "1x256x144", "17x144x256"}
    assert stats.shapes[(1, 192, 256)] == 8  # 240x320 and 200x300 share the 3:4 bucket
    assert all(16384 <= s.height * s.width <= 65536 for s in index.shapes)
    # Plain mode with min_hxw 1: an 8x12 image floors to 0x0 -> stride mismatch.
    tiny = [{"path": "t.jpg", "cap": "c", "resolution": {"height": 8, "width": 12}}] + recs
    _, stats = build_index(tiny, _preprocess(force_resolution=False, max_hxw=65536, min_hxw=1, max_h_div_w_ratio=2.0,
                                     min_h_div_w_ratio=0.5), global_batch_size=1)
    assert stats.counters["img_res_mismatch_stride"] == 1


def test_frame_math_tables():
    def t_len(fps, n, a=8, p=1, m=29, target=121):
        length = int(F.num_candidates(n, F.resample_interval(fps, 24)))
        return length, F.valid_frame_count(min(length, target), a, p, m)

    assert t_len(30, 150) == (120, 113) and t_len(30, 151) == (121, 121)
    assert t_len(60, 300) == (120, 113) and t_len(25, 121) == (117, 113)
    assert F.resample_interval(23.976, 24) == 1.0 and F.resample_interval(23.9, 24) < 1
    for fps in (24, 23.976, 25, 29.97, 30, 50, 60):
        for n in (121, 150, 151, 200, 300):
            c = F.candidate_indices(0, n, F.resample_interval(fps, 24))
            assert len(c) == int(F.num_candidates(n, F.resample_interval(fps, 24)))
            assert c[0] == 0 and c[-1] < n and np.all(np.diff(c) >= 1)
    assert list(F.candidate_indices(0, 10, 2.5)) == [0, 2, 5, 7]
    assert list(F.candidate_indices(0, 10, 1.25)) == [0, 1, 2, 3, 5, 6, 7, 8]
    valid = lambda a, p: [y for y in range(1, 130) if F.valid_frame_count(y, a, p, 29) == y]
    assert valid(8, 1) == [33, 41, 49, 57, 65, 73, 81, 89, 97, 105, 113, 121, 129]
    assert valid(4, 1)[:4] == [29, 33, 37, 41]
    assert valid(8, 2) == [41, 57, 73, 89, 105, 121]
    assert F.valid_frame_count(28, 8, 1, 29) == -1
    # Window starts cover every position, including the last (the reference never picks it).
    rng = np.random.default_rng(0)
    starts = {int(F.sample_frame_indices(0, 40, 1.0, 17, 17, 1.0, rng)[0]) for _ in range(400)}
    assert starts == set(range(24))


def test_speed_factor_filter_and_reader_agree():
    preprocess = _preprocess(speed_factor=2.0, num_frames=17, too_long_factor=10.0)
    recs = [{"path": f"v{k}.mp4", "cap": "c", "resolution": {"height": 128, "width": 256}, "num_frames": n, "fps": 24}
            for k, n in enumerate([40, 40, 40, 40, 30, 30, 30, 30])]
    index, _ = build_index(recs, preprocess, global_batch_size=1)
    rng = np.random.default_rng(0)
    for i in range(len(index)):
        idx = index.frame_indices(i, preprocess, rng)
        assert len(idx) == index.shape(i).frames == 17
        assert np.all(np.diff(idx) >= 1) and idx[-1] < index.num_frames[i]


def test_plans_without_reading(synth):
    cfg = load_data_config(synth.data_json)
    plans = list(iter_annotation_plans(cfg, seed=3))
    again = list(iter_annotation_plans(cfg, seed=3))
    assert len(plans) == 20 and all(np.array_equal(a.frame_indices, b.frame_indices) for a, b in zip(plans, again))
    for p in plans:
        assert len(p.frame_indices) == p.shape.frames
        if p.path.endswith("v24_60.mp4"):
            assert p.frame_indices.min() >= 30 and p.frame_indices.max() <= 59
        if p.path.endswith("v24_17.mp4"):
            assert list(p.frame_indices) == list(range(17))


def test_config_rejects_invalid_num_frames(synth, tmp_path):
    d = data_json_dict(synth.data_txt, num_frames=20)
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="num_frames"):
        load_data_config(tmp_path / "d.json")


def test_filter_200k_records_fast():
    rng = np.random.default_rng(0)
    n = 200_000
    hs = rng.choice([720, 1080, 576, 480, 1920], n)
    fps = rng.choice([24.0, 30.0, 25.0, 60.0, 12.0], n)
    nf = rng.integers(50, 700, n)
    recs = [{"path": f"clip_{i}.mp4" if i % 5 else f"img_{i}.jpg", "cap": "a caption",
             "resolution": {"height": int(h), "width": 1920 if h != 1920 else 1080},
             "num_frames": int(m), "fps": float(f), "cut": [3, int(m) + 3]}
            for i, (h, f, m) in enumerate(zip(hs, fps, nf))]
    preprocess = _preprocess(num_frames=121, min_num_frames=29, max_height=576, max_width=1024, max_hxw=589824,
                             min_hxw=589824)
    t0 = time.perf_counter()
    index, stats = build_index(recs, preprocess, global_batch_size=8)
    elapsed = time.perf_counter() - t0
    assert stats.kept == len(index) > 0
    assert sum(stats.counters.values()) + stats.kept == n
    print(f"filtered {n} records in {elapsed:.2f}s")
