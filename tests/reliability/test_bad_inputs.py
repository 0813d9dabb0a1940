"""One test per kind of bad input of issue 25, each through the entry point's own `main` (in this process): every
one is refused with exit status 2 and one line naming what was given, before anything is built or written. The
generated variants of the same kinds are in test_fuzz_entry_points.py and test_fuzz_annotations.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from mindspeed_mm_osp.checkpoint import convert
from mindspeed_mm_osp.data import load_annotations
from mindspeed_mm_osp.data.readers import DatasetError
from mindspeed_mm_osp.errors import EXIT_BUG, EXIT_CLOSED_PIPE, entry_point
from mindspeed_mm_osp.features.dataset import FeatureCache
from mindspeed_mm_osp.features.format import FORMAT_VERSION, CacheMismatchError
from mindspeed_mm_osp.inference import cli as inference_cli
from mindspeed_mm_osp.tools import extract_features, make_synthetic_dataset, plan, reconstruct_video
from mindspeed_mm_osp.training import cli as training_cli
from reliability_harness import run_ranks, train_argv
from test_fuzz_entry_points import assert_clean_refusal, invoke

NOT_UTF8 = b'{"prompt": "caf\xe9"}\n'


@pytest.fixture(scope="module")
def inference_config(tmp_path_factory):
    from helpers import make_tiny_inference

    return make_tiny_inference(tmp_path_factory.mktemp("bad_inputs_inference"))


def _with(source: Path, where: Path, update: Callable) -> Path:
    doc = json.loads(source.read_text())
    update(doc)
    out = where / f"edited_{source.name}"
    out.write_text(json.dumps(doc))
    return out


def test_non_utf8_where_text_is_expected(micro_assets, inference_config, tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(NOT_UTF8)
    for main, argv in ((training_cli.main, train_argv({**micro_assets, "model_json": bad}, iters=1)),
                       (inference_cli.main, ["--config", str(bad)]),
                       (inference_cli.main, ["--config", str(inference_config), "--prompt", str(bad),
                                             "--save-path", str(tmp_path / "o")])):
        code, err = invoke(main, argv)
        assert_clean_refusal(code, err, [str(bad)], argv)
        assert "UTF-8" in err
    data_txt = tmp_path / "data.txt"
    data_txt.write_bytes(b"/folder\xff,anno.json\n")
    data_json = _with(micro_assets["data_json"], tmp_path, lambda d: d["dataset_param"]["basic_parameters"].update(
        data_path=str(data_txt)))
    code, err = invoke(training_cli.main, train_argv(micro_assets, iters=1, data_json=data_json))
    assert_clean_refusal(code, err, [str(data_txt)], "data.txt")


def _pretrain_main(rank, world_size, argv):
    from reliability_harness import cli_main

    return cli_main(argv)


def test_malformed_annotation_json_names_the_file(micro_assets, tmp_path):
    """Annotation files are read when the data is built, after the process groups: run in a forked rank, as
    training does (this test process must not hold gloo threads when later tests fork)."""
    anno = tmp_path / "anno.json"
    anno.write_text('[{"path": "a.mp4", "cap": "x", ')
    (tmp_path / "data.txt").write_text(f"{tmp_path},{anno}\n")
    data_json = _with(micro_assets["data_json"], tmp_path, lambda d: d["dataset_param"]["basic_parameters"].update(
        data_path=str(tmp_path / "data.txt")))
    ok, out = run_ranks(_pretrain_main, 1, train_argv(micro_assets, iters=1, data_json=data_json))[0]
    assert ok, out
    assert_clean_refusal(out["code"], out["stderr"], [str(anno)], "annotation")
    assert "invalid JSON at line 1" in out["stderr"]


def test_garbage_safetensors_in_a_latents_folder(inference_config, tmp_path):
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "000000.safetensors").write_bytes(b"\xff" * 64)
    code, err = invoke(inference_cli.main, ["--config", str(inference_config), "--decode-latents", str(latents),
                                            "--save-path", str(tmp_path / "videos")])
    assert_clean_refusal(code, err, [str(latents / "000000.safetensors")], "latents")
    assert not (tmp_path / "videos").exists()


def test_inputs_that_are_readable_but_not_what_was_asked(inference_config, tiny_assets, tmp_path):
    """A weights file among latents, an empty prompt file, a folder of videos none of which decodes, a data.txt
    listing nothing: each one line naming it, nothing written, not an exit 0 after doing nothing."""
    from safetensors.torch import save_file

    latents = tmp_path / "latents"
    latents.mkdir()
    save_file({"weight": torch.zeros(2)}, str(latents / "000000.safetensors"))
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"\x00not a video" * 20)
    for main, argv, named in (
            (inference_cli.main, ["--config", str(inference_config), "--decode-latents", str(latents), "--save-path",
                                  str(tmp_path / "o")], "000000.safetensors"),
            (inference_cli.main, ["--config", str(inference_config), "--prompt", str(empty), "--save-path",
                                  str(tmp_path / "o")], str(empty)),
            (reconstruct_video.main, ["--model-config", str(tiny_assets["model_json"]), "--data", str(videos),
                                      "--num-frames", "9", "--size", "32", "32", "--out", str(tmp_path / "r")],
             str(videos))):
        code, err = invoke(main, argv)
        assert_clean_refusal(code, err, [named], argv)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r" / "metrics.json").exists()
    (tmp_path / "data.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="lists no annotation file"):
        load_annotations(tmp_path / "data.txt")


def test_garbage_shard_in_a_feature_cache(tmp_path):
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 56)
    latent = {"latent_dim": 1, "shift": [0.0], "scale": [1.0]}
    index = {"format_version": FORMAT_VERSION, "provenance": {}, "latent": latent, "text": {}, "samples": {},
             "texts": {}, "failed": {}, "shards": [{"file": shard.name, "sha256": "0", "bytes": 64, "samples": 1}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheMismatchError, match="not a readable safetensors file") as err:
        FeatureCache(tmp_path).check_shards()
    assert str(shard) in str(err.value)
    shard.write_bytes(b"\x00" * 10)
    with pytest.raises(CacheMismatchError, match="recorded size 64"):
        FeatureCache(tmp_path).check_shards()
    (tmp_path / "index.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(CacheMismatchError, match="incomplete feature-cache index"):
        FeatureCache(tmp_path)


def test_file_where_a_folder_is_expected_and_the_reverse(micro_assets, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    model_json = _with(micro_assets["model_json"], tmp_path, lambda d: d["text_encoder"].update(
        from_pretrained=str(a_file)))
    code, err = invoke(training_cli.main, train_argv({**micro_assets, "model_json": model_json}, iters=1))
    assert_clean_refusal(code, err, [str(a_file)], "text encoder file")
    assert "is a file, expected a folder" in err
    model_json = _with(micro_assets["model_json"], tmp_path, lambda d: d["ae"].update(from_pretrained=str(tmp_path)))
    code, err = invoke(training_cli.main, train_argv({**micro_assets, "model_json": model_json}, iters=1))
    assert_clean_refusal(code, err, [str(tmp_path)], "VAE folder")
    assert "is a folder, expected a file" in err
    code, err = invoke(convert.cli, ["--load_dir", str(a_file), "--save_dir", str(tmp_path / "o")])
    assert_clean_refusal(code, err, [str(a_file)], "converter file")


def test_an_output_that_already_exists(inference_config, tiny_assets, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "000001.mp4").write_bytes(b"earlier")
    (done / "metrics.json").write_text("{}")
    cases = [
        (inference_cli.main, ["--config", str(inference_config), "--save-path", str(done), "--prompt", "a cat"]),
        (inference_cli.main, ["--config", str(inference_config), "--benchmark", "--report",
                              str(done / "metrics.json")]),
        (make_synthetic_dataset.main, [str(done)]),
        (reconstruct_video.main, ["--model-config", str(tiny_assets["model_json"]), "--data", str(done),
                                  "--num-frames", "9", "--size", "32", "32", "--out", str(done)]),
    ]
    for main, argv in cases:
        code, err = invoke(main, argv)
        assert_clean_refusal(code, err, [str(done)], argv)
        assert "--overwrite" in err
    assert sorted(p.name for p in done.iterdir()) == ["000001.mp4", "metrics.json"]


@pytest.mark.parametrize("key", ["data_path", "annotation", "tokenizer", "t5", "clip", "vae"])
def test_missing_path_inside_a_config(micro_assets, tmp_path, key):
    missing = str(tmp_path / "absent")
    data_json, model_json = micro_assets["data_json"], micro_assets["model_json"]
    if key == "annotation":
        (tmp_path / "data.txt").write_text(f"{tmp_path},{missing}\n")
        data_json = _with(data_json, tmp_path, lambda d: d["dataset_param"]["basic_parameters"].update(
            data_path=str(tmp_path / "data.txt")))
    elif key in ("data_path", "tokenizer"):
        block = ("basic_parameters", "data_path") if key == "data_path" else ("tokenizer_config", "from_pretrained")
        data_json = _with(data_json, tmp_path, lambda d: d["dataset_param"][block[0]].update({block[1]: missing}))
    else:
        block = {"t5": "text_encoder", "clip": "text_encoder_2", "vae": "ae"}[key]
        model_json = _with(model_json, tmp_path, lambda d: d[block].update(from_pretrained=missing))
    argv = train_argv({**micro_assets, "model_json": model_json}, iters=1, data_json=data_json)
    code, err = invoke(training_cli.main, argv)
    assert_clean_refusal(code, err, [missing], key)
    assert "does not exist" in err
    if key != "annotation":  # extract_features reads the same configs through the same check
        code, err = invoke(extract_features.main, ["--mm-data", str(data_json), "--mm-model", str(model_json),
                                                   "--out", str(tmp_path / "cache")])
        assert_clean_refusal(code, err, [missing], key)


@pytest.mark.parametrize("flag, value, where", [
    ("--guidance-scale", "nan", "inference"), ("--num-inference-steps", "-3", "inference"),
    ("--seed", "-1", "inference"), ("--cache-threshold", "inf", "inference"), ("--strength", "1.5", "inference"),
    ("--num-videos", "-2", "synthetic"), ("--world-size", "0", "plan"), ("--device-memory-gib", "0", "plan"),
    ("--device-memory-gib", "nan", "plan"), ("--shard-size", "0", "extract"), ("--iteration", "latest", "convert"),
    ("--target-tp", "0", "convert"), ("--lr", "nan", "pretrain"), ("--micro-batch-size", "-1", "pretrain"),
])
def test_numbers_that_parse_but_make_no_sense(micro_assets, inference_config, tmp_path, flag, value, where):
    assets = ["--mm-data", str(micro_assets["data_json"]), "--mm-model", str(micro_assets["model_json"])]
    main, argv = {
        "inference": (inference_cli.main, ["--config", str(inference_config)]),
        "synthetic": (make_synthetic_dataset.main, [str(tmp_path / "out")]),
        "plan": (plan.main, assets),
        "extract": (extract_features.main, assets + ["--out", str(tmp_path / "cache")]),
        "convert": (convert.cli, ["--load_dir", str(tmp_path), "--save_dir", str(tmp_path / "o")]),
        "pretrain": (training_cli.main, train_argv(micro_assets, iters=1)),
    }[where]
    code, err = invoke(main, argv + [flag, value])
    assert_clean_refusal(code, err, [flag], value)
    assert value in err.strip().splitlines()[-1] or "range" in err or "must be" in err


def test_zero_world_size_from_the_launcher(micro_assets, monkeypatch):
    for value in ("0", "two"):
        monkeypatch.setenv("WORLD_SIZE", value)
        code, err = invoke(training_cli.main, train_argv(micro_assets, iters=1))
        assert_clean_refusal(code, err, ["WORLD_SIZE"], value)


def test_a_bug_keeps_its_traceback_and_says_so():
    @entry_point("tool")
    def main(argv=None):
        return {}["missing key"]  # a genuine bug, not an input problem

    code, err = invoke(main, [])
    assert code == EXIT_BUG != 2
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].startswith("tool: internal error (KeyError): this is a bug")


def test_a_reader_that_stops_early_ends_the_tool_quietly():
    """`tool | head`: the closed pipe is not reported as a bug."""
    script = ("from mindspeed_mm_osp.errors import entry_point\n"
              "@entry_point('tool')\n"
              "def main(argv=None):\n"
              "    for i in range(200000):\n"
              "        print('row', i)\n"
              "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == EXIT_CLOSED_PIPE and err == ""
