"""prepare_dataset on a folder of real clips, images and broken files; its dry run; inspect_dataset; the filter's
named keys (an empty index, the minority rule); a short training run from the prepared folder."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mindspeed_mm_osp.config import ConfigError, load_data_config
from mindspeed_mm_osp.data import PyAVReader, build_index, load_annotations, make_video_reader
from mindspeed_mm_osp.data.index import NothingSurvivedError
from mindspeed_mm_osp.data.prepare import PrepareOptions, run_prepare
from mindspeed_mm_osp.tools.make_synthetic_dataset import (data_json_dict, decode_frame_index, frame_pixels,
                                                           write_image, write_video)

ROOT = Path(__file__).resolve().parents[2]
H, W = 64, 128
RES = {"height": H, "width": W}
CSV_CAPTIONS = {"clip_b.mp4": "clip b from the csv", "sub/clip_c.mp4": "clip c from the csv",
                "rotated.mp4": "a phone clip held upright"}


def write_rotated(path: Path, frames: int, stored_h: int, stored_w: int, degrees: int) -> None:
    """An mp4 whose frames are stored `stored_h` x `stored_w` with a display-matrix rotation, as phones write."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = stored_w, stored_h, "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        stream.set_display_rotation(degrees)
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pixels(k, stored_h, stored_w), "rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(folder, captions CSV): clips at 24 and 30 fps, a rotated clip, a 60-frame clip, images, broken files."""
    root = tmp_path_factory.mktemp("own_videos")
    folder = root / "videos"
    (folder / "sub").mkdir(parents=True)
    write_video(folder / "clip_a.mp4", 20, H, W, 24)
    write_video(folder / "clip_b.mp4", 24, H, W, 30)
    write_video(folder / "sub" / "clip_c.mp4", 20, H, W, 24)
    write_video(folder / "long.mp4", 60, H, W, 24)
    write_rotated(folder / "rotated.mp4", 20, W, H, 90)  # stored portrait, displayed landscape
    for i, ext in enumerate((".png", ".jpg", ".png", ".jpg")):
        write_image(folder / f"img{i}{ext}", H, W)
        (folder / f"img{i}.txt").write_text(f"picture {i}\n")
    write_image(folder / "nocap.png", H, W)
    (folder / "clip_a.txt").write_text("  clip a from its sidecar \n")
    (folder / "long.txt").write_text("a long clip")
    (folder / "sub" / "clip_c.txt").write_text("the csv wins over this")
    data = (folder / "clip_a.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) * 4 // 10])
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video at all")
    (folder / "notes.md").write_text("my notes")
    captions = root / "captions.csv"
    captions.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in CSV_CAPTIONS.items()))
    return folder, captions


def _options(media, out: Path, **kw) -> PrepareOptions:
    folder, captions = media
    template = out.parent / "template.json"
    template.write_text(json.dumps(data_json_dict("unset")))
    return PrepareOptions(folder=folder, out=out, captions=captions, workers=2, split_frames=24, progress=False,
                          data_json_template=template, **kw)


@pytest.fixture(scope="module")
def prepared(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, run_prepare(_options(media, out))


def _video(path, cap, frames, fps, **extra):
    return {"path": path, "cap": cap, "resolution": RES, **extra, "num_frames": frames, "fps": fps}


def test_annotation_is_exact(media, prepared):
    out, result = prepared
    long = [_video("long.mp4", "a long clip", end - first, 24.0, cut=[first, end])
            for first, end in ((0, 24), (24, 48), (48, 60))]
    images = [{"path": f"img{i}{ext}", "cap": f"picture {i}", "resolution": RES}
              for i, ext in enumerate((".png", ".jpg", ".png", ".jpg"))]
    expected = [_video("clip_a.mp4", "clip a from its sidecar", 20, 24.0),
                _video("clip_b.mp4", "clip b from the csv", 24, 30.0), *images[:4], *long,
                {"path": "nocap.png", "resolution": RES},
                _video("rotated.mp4", "a phone clip held upright", 20, 24.0, rotation=90),
                _video("sub/clip_c.mp4", "clip c from the csv", 20, 24.0)]
    assert json.loads((out / "annotation.json").read_text()) == sorted(expected, key=lambda r: r["path"])
    assert (out / "data.txt").read_text() == f"{media[0]},{out / 'annotation.json'}\n"
    assert result.captions == {"captions file": 3, "sidecar .txt": 6, "none": 1}
    assert result.rotated == 1


def test_broken_files_are_listed_with_their_reason(prepared):
    out, result = prepared
    report = dict(line.split("\t") for line in (out / "unreadable.txt").read_text().splitlines()[1:])
    assert set(report) == {"truncated.mp4", "zero.mp4", "text.mp4", "notes.md"}
    assert report["zero.mp4"] == "empty file (0 bytes)"
    assert report["truncated.mp4"].startswith("not a readable video") and report["text.mp4"].startswith("not a")
    assert report["notes.md"].startswith("ignored")
    assert result.kinds == {"video": 5, "image": 5, "unreadable": 3}


def test_training_reads_the_rotated_clip_upright_with_both_readers(media):
    path = str(media[0] / "rotated.mp4")
    frames = {kind: make_video_reader(kind).read(path, np.arange(3)) for kind in ("pyav", "decord")}
    assert frames["pyav"].shape == (3, H, W, 3)
    assert np.array_equal(frames["pyav"], frames["decord"])
    stored = np.rot90(frames["pyav"], k=-1, axes=(1, 2))  # undo the display turn: the encoded pixels
    assert [decode_frame_index(f) for f in stored] == [0, 1, 2]


def test_clips_read_only_their_own_frames(prepared):
    out, _ = prepared
    cfg = load_data_config(out / "data.json")
    pre = cfg.dataset_param.preprocess_parameters
    loaded = load_annotations(out / "data.txt")
    index, _ = build_index(loaded.records, pre, global_batch_size=1)
    rng = np.random.default_rng(0)
    for i in np.flatnonzero(np.char.endswith(np.array(index.paths), "long.mp4")):
        first = int(index.start[i])
        wanted = index.frame_indices(int(i), pre, rng)
        decoded = [decode_frame_index(f) for f in PyAVReader().read(index.paths[i], wanted)]
        assert decoded == wanted.tolist() and first <= min(decoded) and max(decoded) < first + 24
    # a `cut` end shorter than num_frames bounds the clip
    index, _ = build_index([{**loaded.records[0], "cut": [3, 23], "num_frames": 60}] * 4, pre, global_batch_size=1)
    assert index.num_frames.tolist() == [20] * 4


def test_interrupted_then_resumed_equals_uninterrupted(media, prepared, tmp_path):
    out, result = prepared
    first = run_prepare(_options(media, tmp_path / "out", stop_after=4))
    assert not first.complete and first.probed == 4 and not (tmp_path / "out" / "annotation.json").exists()
    second = run_prepare(_options(media, tmp_path / "out", resume=True))
    assert second.complete and second.probed == sum(result.kinds.values()) - 4
    for name in ("annotation.json", "unreadable.txt"):
        assert (tmp_path / "out" / name).read_text() == (out / name).read_text(), name
    assert second.records == result.records


def _run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"mindspeed_mm_osp.tools.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_counts_and_an_all_dropped_filter_names_its_key(prepared, tmp_path):
    out, _ = prepared
    run = _run_tool("prepare_dataset", "--dry-run", str(out / "data.json"))
    assert run.returncode == 0, run.stderr
    assert "kept 10 of 12 records: 6/7 videos, 4/5 images" in run.stdout
    assert "too_short: dataset_param.preprocess_parameters.drop_short_ratio=1.0" in run.stdout
    cfg = json.loads((out / "data.json").read_text())  # the videos only, all longer than 0.01 x 17 frames
    cfg["dataset_param"]["preprocess_parameters"]["too_long_factor"] = 0.01
    cfg["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "videos_only.txt")
    anno = [r for r in json.loads((out / "annotation.json").read_text()) if r["path"].endswith(".mp4")]
    (tmp_path / "videos_only.json").write_text(json.dumps(anno))
    (tmp_path / "videos_only.txt").write_text(f"{(out / 'data.txt').read_text().rsplit(',', 1)[0]},"
                                              f"{tmp_path / 'videos_only.json'}\n")
    (tmp_path / "drop.json").write_text(json.dumps(cfg))
    run = _run_tool("prepare_dataset", "--dry-run", str(tmp_path / "drop.json"))
    errors = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "dropped as too_long by dataset_param.preprocess_parameters.too_long_factor=0.01" in errors[0]


def test_minority_rule_is_a_key_and_warns(prepared, caplog):
    out, _ = prepared
    pre = load_data_config(out / "data.json").dataset_param.preprocess_parameters
    records = load_annotations(out / "data.txt").records
    def factor(n):
        return pre.__class__(**{**pre.__dict__, "min_samples_per_shape_factor": n})

    assert len(build_index(records, pre, global_batch_size=1)[0]) == 10  # the default 4: 6 clips, 4 images
    with caplog.at_level(logging.WARNING, logger="mindspeed_mm_osp.data.index"):
        index, stats = build_index(records, factor(5), global_batch_size=1)  # 4 images < 5 x 1
    assert stats.counters["filter_minority"] == 4 and len(index) == 6
    assert "filter_minority dropped 4 samples" in caplog.text
    assert "min_samples_per_shape_factor=5" in caplog.text and "global_batch_size=1" in caplog.text
    assert len(build_index(records, factor(0), global_batch_size=100)[0]) == 10
    with pytest.raises(NothingSurvivedError, match="min_samples_per_shape_factor=100"):
        build_index(records, factor(100), global_batch_size=1)
    cfg = json.loads((out / "data.json").read_text())
    cfg["dataset_param"]["preprocess_parameters"]["min_samples_per_shape_factor"] = -1
    (out.parent / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="min_samples_per_shape_factor"):
        load_data_config(out.parent / "bad.json")


def test_inspect_dataset_table_and_png(prepared, tmp_path, monkeypatch, capsys):
    from mindspeed_mm_osp.tools import inspect_dataset

    out, _ = prepared
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
    inspect_dataset.main([str(out / "data.json"), "--png", str(tmp_path / "r.png")])
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err and not (tmp_path / "r.png").exists()
    for title in ("duration (seconds, videos)", "frames after resampling", "aspect ratio", "caption length in words"):
        assert title in captured.out
    assert "17x64x128        6        6" in captured.out and "64x128       12" in captured.out
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    inspect_dataset.main([str(out / "data.json"), "--png", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _train(rank, world_size, argv):
    """Rank body: pretrain with the package log captured (module level so forked ranks can run it)."""
    import io

    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    buf = io.StringIO()
    logging.getLogger("mindspeed_mm_osp").addHandler(logging.StreamHandler(buf))
    result = pretrain(parse_args(argv, world_size=world_size))
    return {"iteration": result.iteration, "losses": result.losses, "log": buf.getvalue()}


def test_training_runs_from_the_prepared_folder(media, tiny_assets, tmp_path):
    from mindspeed_mm_osp.testing import run_distributed
    from helpers import training_argv

    opts = _options(media, tmp_path / "out")
    shutil.copy(tiny_assets["data_json"], opts.data_json_template)  # with the tiny tokenizers
    result = run_prepare(opts)
    argv = training_argv({**tiny_assets, "data_json": result.data_json}, iters=2)
    out = run_distributed(_train, 1, argv, timeout=240)[0]
    assert out["iteration"] == 2 and all(np.isfinite(out["losses"]))
    assert "10 of 12 records kept" in out["log"] and "read failed" not in out["log"]


def test_extract_features_names_the_keys_that_train_from_its_cache(tmp_path):
    from dataclasses import fields

    from mindspeed_mm_osp.config.data import DatasetParam
    from mindspeed_mm_osp.config.model import ModelConfig
    from mindspeed_mm_osp.tools.extract_features import train_from_cache

    text = train_from_cache("d.json", "m.json", tmp_path)
    for cls, keys in ((DatasetParam, ["feature_cache_dir"]), (ModelConfig, ["load_video_features",
                                                                           "load_text_features"])):
        assert all(f'"{key}"' in text and key in {f.name for f in fields(cls)} for key in keys)
    assert f'"feature_cache_dir": "{tmp_path}"' in text and "pretrain.py --mm-data d.json --mm-model m.json" in text


@pytest.mark.parametrize("case", ["missing folder", "captions header", "nothing to resume", "taken out", "workers"])
def test_bad_input_is_one_line_and_exit_2(media, prepared, tmp_path, capsys, case):
    from mindspeed_mm_osp.tools import prepare_dataset

    folder, captions = media
    (tmp_path / "bad.csv").write_text("file,text\na.mp4,x\n")
    argv, named = {
        "missing folder": ([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "FOLDER"),
        "captions header": ([str(folder), "--out", str(tmp_path / "o"), "--captions", str(tmp_path / "bad.csv")],
                            "path,caption"),
        "nothing to resume": ([str(folder), "--out", str(tmp_path / "o"), "--resume"], "nothing to resume"),
        "taken out": ([str(folder), "--out", str(prepared[0])], "--overwrite"),
        "workers": ([str(folder), "--out", str(tmp_path / "o"), "--workers", "0"], "--workers"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        prepare_dataset.main(argv + ["--no-progress", "--data-json", str(prepared[0] / "data.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and named in err[0], err
