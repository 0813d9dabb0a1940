"""Property-based fuzzing of every door: `pretrain.py`, `inference.py`, `convert_mm_to_ckpt.py` and every
`python -m mindspeed_mm_osp.tools.*` module, each called in this process through its `main(argv)` (the error
boundary `errors.entry_point` included).

Each case is a valid command line with one fault: a numeric flag set to a value outside its stated range (NaN,
inf, a huge negative, text, empty), a file argument replaced by a broken file (missing, a folder, binary bytes,
non-UTF-8 text, truncated, empty), a JSON config with one value swapped for another JSON type, a path inside a
config pointing at a broken file, or an output that already exists. Every case must end in a clean refusal:
exit status 2, no traceback, and a last stderr line naming something that was given (the flag, the file or the
key). Figures: docs/reliability.md ("Every door").
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_mm_osp.checkpoint import convert
from mindspeed_mm_osp.inference import arguments as inference_arguments
from mindspeed_mm_osp.inference import cli as inference_cli
from mindspeed_mm_osp.tools import extract_features, make_synthetic_dataset, make_tiny_models, plan
from mindspeed_mm_osp.tools import reconstruct_video
from mindspeed_mm_osp.training import arguments as training_arguments
from mindspeed_mm_osp.training import cli as training_cli
from helpers import json_key_paths, json_set
from reliability_harness import log, train_argv

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BAD_NUMBERS = ["nan", "inf", "-inf", "abc", "", "-1000000000", "1e400", "0x10"]
BROKEN_KINDS = ["missing", "folder", "binary", "not_utf8", "truncated", "empty"]
OTHER_TYPES = ["text", 3.5, [1, 2], {"x": 1}, True, float("nan"), float("inf")]


def invoke(main: Callable, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `main(argv)` in this process; an escaping exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def assert_clean_refusal(code: int, err: str, given: list[str], case) -> None:
    assert code == 2, (case, code, err[-2000:])
    assert "Traceback" not in err, (case, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert any(str(g) in last for g in given), f"{case}: the message names none of {given}: {last}"


def broken_file(kind: str, source: Path | None, where: Path) -> Path:
    """A file where a good one (`source`) was expected, broken as `kind` says."""
    path = where / f"broken_{kind}{source.suffix if source else ''}"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "not_utf8":
        path.write_bytes(b'{"a": "caf\xe9 \xff\xfe"}\n')
    elif kind == "truncated":
        data = source.read_bytes() if source and source.is_file() else b'{"a": [1, 2'
        path.write_bytes(data[: max(1, len(data) // 2)])
    elif kind == "empty":
        path.write_bytes(b"")
    return path


def broken_path(expected: str, how: str, where: Path) -> Path:
    """Where a file (`expected="file"`) or a folder (`"dir"`) was expected: nothing (`how="missing"`), or the
    other kind."""
    if how == "missing":
        return where / "absent"
    return broken_file("folder" if expected == "file" else "binary", None, where)


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if value == value and abs(value) != float("inf") else "nonfinite"
    return type(value).__name__


def _at(doc, path: tuple):
    for part in path:
        doc = doc[part]
    return doc


@st.composite
def type_swap(draw, source: Path, prefix: tuple = ()):
    """(key path, new value): one value of the JSON at `source` (under `prefix`) replaced by a value of another
    JSON type. Nulls (optional keys: any type may fill them) are left alone."""
    doc = json.loads(source.read_text())
    paths = [p for p in json_key_paths(doc) if p[:len(prefix)] == prefix and _at(doc, p) is not None]
    path = draw(st.sampled_from(paths))
    old = _at(doc, path)
    value = draw(st.sampled_from([v for v in OTHER_TYPES if _json_type(v) != _json_type(old)]))
    return path, value


def swapped_json(source: Path, path: tuple, value, where: Path) -> Path:
    doc = json.loads(source.read_text())
    json_set(doc, path, value)
    out = where / f"swapped_{source.name}"
    out.write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def stats():
    counts: dict[str, int] = {}
    yield counts
    log(f"entry-point fuzzing: {sum(counts.values())} cases, each a clean refusal (exit 2, no traceback, one line "
        f"naming the input; the test fails on the first that is not): {counts}")


def record(stats: dict, name: str) -> None:
    """Count a case (called once it passed `assert_clean_refusal`)."""
    stats[name] = stats.get(name, 0) + 1


@pytest.fixture
def scratch(tmp_path_factory):
    """A fresh folder per hypothesis example (a module-level counter keeps the names apart)."""
    counter = iter(range(10**9))
    return lambda: tmp_path_factory.mktemp(f"case{next(counter)}")


# ------------------------------------------------------------------------------------------ training side

CONFIG_PATH_KEYS = {  # paths inside the configs: (which JSON, key path, what the key names)
    "data_path": ("data_json", ("dataset_param", "basic_parameters", "data_path"), "file"),
    "tokenizer": ("data_json", ("dataset_param", "tokenizer_config", "from_pretrained"), "dir"),
    "vae": ("model_json", ("ae", "from_pretrained"), "file"),
    "t5": ("model_json", ("text_encoder", "from_pretrained"), "dir"),
    "clip": ("model_json", ("text_encoder_2", "from_pretrained"), "dir"),
}


@st.composite
def training_faults(draw, flags: list[str], config_paths: bool = True):
    kinds = ["flag", "file", "json"] + (["config_path"] if config_paths else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "flag":
        return kind, draw(st.sampled_from(flags)), draw(st.sampled_from(BAD_NUMBERS))
    if kind == "file":
        return kind, draw(st.sampled_from(["--mm-data", "--mm-model"])), draw(st.sampled_from(BROKEN_KINDS))
    if kind == "json":
        which = draw(st.sampled_from(["data_json", "model_json"]))
        return kind, which, draw(type_swap(Path(TRAINING_JSONS[which])))
    key = draw(st.sampled_from(sorted(CONFIG_PATH_KEYS)))
    return kind, key, draw(st.sampled_from(["missing", "other_kind"]))


TRAINING_JSONS: dict[str, str] = {}


def training_case(assets: dict, fault: tuple, where: Path) -> tuple[list[str], list[str]]:
    """(argv with the fault, what the refusal must name)."""
    kind, what, how = fault
    data, model = Path(assets["data_json"]), Path(assets["model_json"])
    if kind == "flag":
        return ["--mm-data", str(data), "--mm-model", str(model), what, how], [what]
    if kind == "file":
        bad = broken_file(how, data if what == "--mm-data" else model, where)
        files = {"--mm-data": data, "--mm-model": model, what: bad}
        return ["--mm-data", str(files["--mm-data"]), "--mm-model", str(files["--mm-model"])], [str(bad)]
    if kind == "json":
        path, value = how
        swapped = swapped_json(data if what == "data_json" else model, path, value, where)
        files = {"data_json": data, "model_json": model, what: swapped}
        return ["--mm-data", str(files["data_json"]), "--mm-model", str(files["model_json"])], [str(swapped)]
    which, key_path, expected = CONFIG_PATH_KEYS[what]
    bad = broken_path(expected, how, where)
    out = swapped_json(data if which == "data_json" else model, key_path, str(bad), where)
    files = {"data_json": data, "model_json": model, which: out}
    return ["--mm-data", str(files["data_json"]), "--mm-model", str(files["model_json"])], [str(bad)]


@pytest.fixture(scope="module")
def training_jsons(micro_assets):
    TRAINING_JSONS.update(data_json=str(micro_assets["data_json"]), model_json=str(micro_assets["model_json"]))
    return micro_assets


def test_fuzz_pretrain(training_jsons, scratch, stats):
    flags = sorted(training_arguments.RANGES)

    @FUZZ
    @given(training_faults(flags))
    def run(fault):
        argv, names = training_case(training_jsons, fault, scratch())
        full = train_argv({"data_json": argv[1], "model_json": argv[3]}, iters=1) + argv[4:]
        code, err = invoke(training_cli.main, full)
        assert_clean_refusal(code, err, names, fault)
        record(stats, "pretrain.py")

    run()


def test_fuzz_plan(training_jsons, scratch, stats):
    flags = sorted(training_arguments.RANGES) + sorted(plan.RANGES)

    @FUZZ
    @given(training_faults(flags, config_paths=False))
    def run(fault):
        argv, names = training_case(training_jsons, fault, scratch())
        code, err = invoke(plan.main, argv + (["--world-size", "1"] if "--world-size" not in argv else []))
        assert_clean_refusal(code, err, names, fault)
        record(stats, "tools.plan")

    run()


def test_fuzz_extract_features(training_jsons, scratch, stats):
    flags = sorted(extract_features.RANGES)

    @FUZZ
    @given(training_faults(flags) | st.just(("out_is_file", "--out", None)))
    def run(fault):
        where = scratch()
        out = where / "cache"
        if fault[0] == "out_is_file":
            out.write_text("not a folder")
            argv = ["--mm-data", str(training_jsons["data_json"]), "--mm-model", str(training_jsons["model_json"])]
            names = [str(out)]
        else:
            argv, names = training_case(training_jsons, fault, where)
        code, err = invoke(extract_features.main, argv + ["--out", str(out), "--no-progress"])
        assert_clean_refusal(code, err, names, fault)
        record(stats, "tools.extract_features")

    run()


def test_pretrain_load_rule(training_jsons, tmp_path):
    """--load must hold a checkpoint, unless it is empty or absent and also --save; a file is refused."""
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a checkpoint")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    for load, save in ((stray, None), (tmp_path / "absent", None), (weights, None), (tmp_path / "empty", stray)):
        (tmp_path / "empty").mkdir(exist_ok=True)
        extra = ["--load", str(load)] + (["--save", str(save)] if save else [])
        code, err = invoke(training_cli.main, train_argv(training_jsons, *extra, iters=1))
        assert_clean_refusal(code, err, ["--load"], extra)
        assert str(load) in err.strip().splitlines()[-1]
    # The launcher pattern: --load = --save, empty or absent -> accepted by the check (training would start).
    for folder in (tmp_path / "fresh", tmp_path / "empty"):
        args = training_arguments.parse_args(train_argv(training_jsons, "--load", str(folder), "--save", str(folder)))
        training_cli.check_resume_path(args)


# ----------------------------------------------------------------------------------------- inference side


@pytest.fixture(scope="module")
def inference_setup(tmp_path_factory):
    from helpers import make_tiny_inference

    root = tmp_path_factory.mktemp("fuzz_inference")
    config = make_tiny_inference(root)
    latents = root / "latents"
    latents.mkdir()
    (latents / "000000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    done = root / "done"
    done.mkdir()
    (done / "000000.mp4").write_bytes(b"an earlier output")
    return {"config": config, "latents": latents, "done": done}


INFERENCE_PATH_KEYS = [("ae", "from_pretrained"), ("text_encoder", "from_pretrained"), ("tokenizer", "from_pretrained"),
                       ("text_encoder_2", "from_pretrained")]


@st.composite
def inference_faults(draw, config: Path):
    kind = draw(st.sampled_from(["flag", "config", "json", "config_path", "prompt", "decode", "image", "save_path",
                                 "existing"]))
    if kind == "flag":
        return kind, draw(st.sampled_from(sorted(inference_arguments.RANGES))), draw(st.sampled_from(BAD_NUMBERS))
    if kind == "config":
        return kind, "--config", draw(st.sampled_from(BROKEN_KINDS))
    if kind == "json":
        return kind, "--config", draw(type_swap(config))
    if kind == "config_path":
        return kind, draw(st.sampled_from(INFERENCE_PATH_KEYS)), draw(st.sampled_from(["missing", "other_kind"]))
    return kind, None, None


def inference_case(setup: dict, fault: tuple, where: Path) -> tuple[list[str], list[str]]:
    kind, what, how = fault
    config, out = setup["config"], where / "out"
    base = ["--save-path", str(out), "--prompt", "a cat"]
    if kind == "flag":
        return ["--config", str(config), *base, what, how], [what]
    if kind == "config":
        bad = broken_file(how, config, where)
        return ["--config", str(bad), *base], [str(bad)]
    if kind == "json":
        swapped = swapped_json(config, *how, where)
        return ["--config", str(swapped), *base], [str(swapped)]
    if kind == "config_path":
        bad = broken_path("file" if what[0] == "ae" else "dir", how, where)
        return ["--config", str(swapped_json(config, what, str(bad), where)), *base], [str(bad)]
    if kind == "prompt":
        bad = broken_file("not_utf8", None, where)
        return ["--config", str(config), "--save-path", str(out), "--prompt", str(bad)], [str(bad)]
    if kind == "decode":
        return ["--config", str(config), "--decode-latents", str(setup["latents"]), "--save-path", str(out)], [
            str(setup["latents"])]
    if kind == "image":
        return ["--config", str(config), *base, "--image", str(where / "absent.png")], [str(where / "absent.png"),
                                                                                        "--image"]
    if kind == "save_path":
        (where / "file").write_text("x")
        return ["--config", str(config), "--save-path", str(where / "file"), "--prompt", "a cat"], [str(where / "file")]
    return ["--config", str(config), "--save-path", str(setup["done"]), "--prompt", "a cat"], [str(setup["done"])]


def test_fuzz_inference(inference_setup, scratch, stats):
    @FUZZ
    @given(inference_faults(inference_setup["config"]))
    def run(fault):
        argv, names = inference_case(inference_setup, fault, scratch())
        code, err = invoke(inference_cli.main, argv)
        assert_clean_refusal(code, err, names, fault)
        record(stats, "inference.py")

    run()


# ------------------------------------------------------------------------------------------- converter


@st.composite
def convert_faults(draw):
    kind = draw(st.sampled_from(["load_dir", "iteration", "target_tp", "tracker", "base"]))
    return kind, draw(st.sampled_from(BROKEN_KINDS)), draw(st.sampled_from(BAD_NUMBERS + ["12x", "-3"]))


def test_fuzz_converter(scratch, stats):
    @FUZZ
    @given(convert_faults())
    def run(fault):
        kind, broken, value = fault
        where = scratch()
        ckpt, out = where / "ckpt", where / "out"
        ckpt.mkdir()
        argv, names = ["--load_dir", str(ckpt), "--save_dir", str(out)], [str(ckpt)]
        if kind == "load_dir":
            bad = broken_file(broken, None, where)
            argv[1], names = str(bad), [str(bad)]
        elif kind == "iteration":
            argv += ["--iteration", value]
            names = ["--iteration", str(ckpt)]
        elif kind == "target_tp":
            argv += ["--target-tp", value]
            names = ["--target-tp"]
        elif kind == "tracker":
            (ckpt / "latest_checkpointed_iteration.txt").write_bytes(value.encode() + b"\xff")
        else:
            bad = broken_file(broken, None, where)
            argv += ["--lora-merge", "--base", str(bad)]
            names = [str(ckpt), str(bad)]
        code, err = invoke(convert.cli, argv)
        assert_clean_refusal(code, err, names, fault)
        assert not out.exists() or not any(out.iterdir())
        record(stats, "convert_mm_to_ckpt.py")

    run()


# ------------------------------------------------------------------------------------------ small tools


def test_fuzz_dataset_and_model_writers(scratch, stats):
    @FUZZ
    @given(st.sampled_from(["make_synthetic_dataset", "make_tiny_models"]),
           st.sampled_from(["flag", "out_is_file", "out_not_empty"]),
           st.sampled_from(["--seed", "--num-videos", "--num-images"]), st.sampled_from(BAD_NUMBERS))
    def run(tool, kind, flag, value):
        main = {"make_synthetic_dataset": make_synthetic_dataset.main, "make_tiny_models": make_tiny_models.main}[tool]
        where = scratch()
        out = where / "out"
        if tool == "make_tiny_models":
            flag = "--seed"
        argv, names = [str(out)], [str(out)]
        if kind == "flag":
            argv += [flag, value]
            names = [flag]
        elif kind == "out_is_file":
            out.write_text("x")
        else:
            out.mkdir()
            (out / "keep.txt").write_text("someone's file")
        code, err = invoke(main, argv)
        assert_clean_refusal(code, err, names, (tool, kind, flag, value))
        assert not out.is_dir() or sorted(p.name for p in out.iterdir()) in ([], ["keep.txt"])
        record(stats, f"tools.{tool}")

    run()


@pytest.fixture(scope="module")
def reconstruct_setup(tiny_assets, tmp_path_factory):
    from mindspeed_mm_osp.tools.make_synthetic_dataset import write_video

    root = tmp_path_factory.mktemp("fuzz_reconstruct")
    (root / "videos").mkdir()
    write_video(root / "videos" / "a.mp4", 9, 32, 32)
    done = root / "done"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    return {"model": Path(tiny_assets["model_json"]), "videos": root / "videos", "done": done}


def test_fuzz_reconstruct_video(reconstruct_setup, scratch, stats):
    s = reconstruct_setup

    @FUZZ
    @given(st.sampled_from(["flag", "size", "config", "json", "vae", "data", "existing"]),
           st.sampled_from(sorted(reconstruct_video.RANGES)), st.sampled_from(BAD_NUMBERS),
           st.sampled_from(BROKEN_KINDS), type_swap(reconstruct_setup["model"], prefix=("ae",)))
    def run(kind, flag, value, broken, swap):
        where = scratch()
        args = {"--model-config": str(s["model"]), "--data": str(s["videos"]), "--num-frames": "9",
                "--out": str(where / "out")}
        extra, names = [], []
        if kind == "flag":
            args[flag], names = value, [flag]
        elif kind == "size":
            extra, names = ["--size", value, "32"], ["--size"]
        elif kind == "config":
            args["--model-config"] = str(broken_file(broken, s["model"], where))
        elif kind == "json":
            args["--model-config"] = str(swapped_json(s["model"], *swap, where))
        elif kind == "vae":
            bad = broken_file("folder" if broken == "folder" else "missing", None, where)
            args["--model-config"], names = str(swapped_json(s["model"], ("ae", "from_pretrained"), str(bad), where)), [
                str(bad)]
        elif kind == "data":
            args["--data"] = str(where / "absent")
        else:
            args["--out"] = str(s["done"])
        names = names or [args["--model-config"], args["--data"], args["--out"]]
        argv = [x for kv in args.items() for x in kv] + (extra or ["--size", "32", "32"])
        code, err = invoke(reconstruct_video.main, argv)
        assert_clean_refusal(code, err, names, (kind, flag, value, broken, swap))
        record(stats, "tools.reconstruct_video")

    run()


# --------------------------------------------------------------------------- the modules' own __main__


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package.*:RuntimeWarning")
@pytest.mark.parametrize("module, argv, named", [
    ("mindspeed_mm_osp.tools.plan", ["--mm-model", "MISSING.json", "--mm-data", "MISSING.json"], "MISSING.json"),
    ("mindspeed_mm_osp.tools.extract_features", ["--mm-data", "MISSING.json", "--mm-model", "m.json", "--out", "o"],
     "MISSING.json"),
    ("mindspeed_mm_osp.tools.make_synthetic_dataset", ["OUT", "--num-videos", "-1"], "--num-videos"),
    ("mindspeed_mm_osp.tools.make_tiny_models", ["OUT", "--seed", "nan"], "--seed"),
    ("mindspeed_mm_osp.tools.reconstruct_video", ["--model-config", "MISSING.json", "--data", ".", "--num-frames",
                                                  "9", "--size", "32", "32", "--out", "o"], "MISSING.json"),
    ("pretrain.py", ["--mm-data", "MISSING.json", "--mm-model", "MISSING.json", "--train-iters", "1"], "MISSING.json"),
    ("inference.py", ["--config", "MISSING.json"], "MISSING.json"),
    ("convert_mm_to_ckpt.py", ["--load_dir", "MISSING", "--save_dir", "o"], "MISSING"),
])
def test_every_module_runs_main_through_the_boundary(module, argv, named, tmp_path, monkeypatch):
    """`python -m ...` / `python script.py` reach the same boundary (runpy: the module's own `__main__` block)."""
    import runpy
    import sys

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        if module.endswith(".py"):
            runpy.run_path(str(root / module), run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert_clean_refusal(e.value.code, err.getvalue(), [named], module)
