"""Text-to-video inference on tiny models: videos and sidecars, two-stage = one-stage, benchmark report,
prompt handling, seeded noise and predictor weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import save_split_checkpoint
from mindspeed_mm_osp.checkpoint.weights import load_predictor_weights
from mindspeed_mm_osp.config import load_inference_config
from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import initial_noise, load_latents, load_prompts
from mindspeed_mm_osp.inference.runner import InferenceRunner, prepare_texts
from mindspeed_mm_osp.inference.video_io import read_mp4
from mindspeed_mm_osp.models.predictor import build_predictor
from helpers import INFERENCE_SIZE, INFERENCE_STEPS, make_tiny_inference

SIZE, STEPS = INFERENCE_SIZE, INFERENCE_STEPS


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return make_tiny_inference(tmp_path_factory.mktemp("tiny_inference"))


def run(config: Path, *extra: str) -> None:
    cli.main(["--config", str(config), *extra])


def test_videos_sidecars_and_two_stage_equal_one_stage(config, tmp_path, monkeypatch):
    decoded = []  # what reaches the VAE, observed (not replaced) in both stages
    real_decode = InferenceRunner.decode

    def observed_decode(runner, latents):
        decoded.append(latents.clone())
        return real_decode(runner, latents)

    monkeypatch.setattr(InferenceRunner, "decode", observed_decode)

    run(config, "--save-path", str(tmp_path / "one"))
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "000000.json", "000000.mp4", "000001.json", "000001.mp4"]
    frames, fps = read_mp4(tmp_path / "one" / "000001.mp4")
    assert frames.shape == (SIZE[0], SIZE[1], SIZE[2], 3) and fps == 8
    record = json.loads((tmp_path / "one" / "000001.json").read_text())
    assert record["prompt"] == "waves crash on a rocky shore"
    assert record["positive_text"] == "high quality, waves crash on a rocky shore"
    assert (record["noise_seed"], record["num_inference_steps"], record["size"]) == (43, STEPS, SIZE)

    run(config, "--save-latents", "--save-path", str(tmp_path / "lat"))
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    saved = load_latents(tmp_path / "lat" / "000001.safetensors")
    assert saved.latents.shape == (4, 2, 4, 6) and saved.latents.dtype == torch.float32
    assert saved.record["prompt"] == "waves crash on a rocky shore"

    run(config, "--decode-latents", str(tmp_path / "lat"), "--save-path", str(tmp_path / "two"))
    assert len(decoded) == 4
    for one_stage, two_stage in zip(decoded[:2], decoded[2:]):
        assert torch.equal(one_stage, two_stage)  # bit-identical latents into the same decoder
    for stem in ("000000", "000001"):
        one, _ = read_mp4(tmp_path / "one" / f"{stem}.mp4")
        two, fps = read_mp4(tmp_path / "two" / f"{stem}.mp4")
        assert fps == 8 and np.array_equal(one, two), stem  # the same frames encode to the same file
    assert json.loads((tmp_path / "two" / "000001.json").read_text())["decoded_from"].endswith("000001.safetensors")


def test_overrides_change_the_result_and_are_recorded(config, tmp_path):
    run(config, "--save-latents", "--save-path", str(tmp_path / "a"), "--prompt", "a cat")
    run(config, "--save-latents", "--save-path", str(tmp_path / "b"), "--prompt", "a cat", "--seed", "7",
        "--guidance-scale", "1.0", "--shift", "3.0", "--num-inference-steps", "1", "--negative-prompt", "dogs")
    a, b = load_latents(tmp_path / "a" / "000000.safetensors"), load_latents(tmp_path / "b" / "000000.safetensors")
    assert not torch.allclose(a.latents, b.latents)
    assert b.record["seed"] == 7 and b.record["guidance_scale"] == 1.0 and b.record["shift"] == 3.0
    assert b.record["num_inference_steps"] == 1 and not b.record["use_dynamic_shifting"]
    assert b.record["negative_text"].endswith("underexposed. dogs")


def test_benchmark_report(config, tmp_path):
    report = tmp_path / "bench.json"
    run(config, "--benchmark", "--warmup", "1", "--repeat", "2", "--report", str(report), "--prompt", "a cat",
        "--save-path", str(tmp_path / "out"))
    data = json.loads(report.read_text())
    counts = {stage: s["count"] for stage, s in data["stages"].items()}
    assert counts == {"text_encode": 2, "denoise_step": 2 * STEPS, "vae_decode": 2, "total": 2}
    for s in data["stages"].values():
        assert 0 < s["min_s"] <= s["mean_s"] <= s["max_s"]
    assert data["peak_memory"]["kind"] == "cpu_peak_rss" and data["peak_memory"]["bytes"] > 0
    assert data["tensor_model_parallel_size"] == 1 and data["input_size"] == SIZE
    assert data["latent_shape"] == [4, 2, 4, 6] and data["weight_dtype"] == "torch.float32"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))


def test_errors_exit_cleanly(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(config, "--predictor-weights", str(tmp_path / "nope.pt"), "--save-path", str(tmp_path / "o"))
    assert exc.value.code == 2 and "nope.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(config, "--size", "10", "32", "32")  # frames must be 8k+1
    assert "8k+1" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        run(config, "--decode-latents", str(tmp_path / "empty"))
    assert not (tmp_path / "o").exists()


def test_prompts_and_templates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n second \n")
    assert load_prompts(str(path)) == ["first", "second"]
    assert load_prompts("just a prompt") == ["just a prompt"]
    pos, neg = prepare_texts(["A\u00a0dog"], None, "v1.5")
    assert pos == ["high quality, a dog"]
    assert neg[0].startswith("worst quality, normal quality, low quality, low res, blurry, artifacts, grainy")


def test_noise_is_per_prompt_and_batch_independent():
    both = initial_noise((4, 2, 3, 3), 5, [0, 1])
    assert torch.equal(both[1], initial_noise((4, 2, 3, 3), 5, [1])[0])
    assert torch.equal(both[0], initial_noise((4, 2, 3, 3), 5, [0])[0])
    assert not torch.equal(both[0], both[1])


def test_weights_loader_detects_final_block_text_params_and_reads_checkpoints(config, tmp_path):
    cfg = load_inference_config(config)
    state = load_predictor_weights(cfg.predictor.from_pretrained)
    key = "transformer_blocks.6.1.attn1.to_add_out.weight"
    assert key in state
    model = build_predictor(cfg.predictor, state, torch.float32, torch.device("cpu"))
    assert model.predictor_config.final_block_text_params and not model.training
    torch.testing.assert_close(model.state_dict()[key], state[key])
    without = {k: v for k, v in state.items() if not k.startswith(("transformer_blocks.6.1.attn1.to_add_out",
                                                                   "transformer_blocks.6.1.norm2.norm_enc",
                                                                   "transformer_blocks.6.1.ff_enc"))}
    assert not build_predictor(cfg.predictor, without, torch.float32, torch.device("cpu")) \
        .predictor_config.final_block_text_params

    # A training checkpoint folder: its EMA is used.
    ema = {k: v + 1 for k, v in state.items()}
    save_split_checkpoint(state, tmp_path / "ckpt", 2, 4, ema_sd=ema)
    loaded = load_predictor_weights(tmp_path / "ckpt")
    torch.testing.assert_close(loaded[key], ema[key])


def test_generates_at_the_smallest_preset(config, tmp_path):
    """--resolution 144p --aspect-ratio 1:1 --duration 1f: the whole pipeline at the smallest preset size."""
    from mindspeed_mm_osp.inference.video_io import read_mp4

    out = tmp_path / "preset"
    run(config, "--prompt", "a small red ball", "--resolution", "144p", "--aspect-ratio", "1:1", "--duration", "1f",
        "--num-inference-steps", "2", "--save-path", str(out))
    frames, _ = read_mp4(out / "000000.mp4")
    assert frames.shape == (1, 144, 144, 3)


def test_benchmark_reports_the_step_cache_and_json_acceleration(config, tmp_path):
    """`--cache-threshold` reaches the sampler (a huge one skips every step but the first and the last) and the
    report; the JSON's `acceleration` block is the default when no flag is given; --cfg-parallel on one process
    stops with a message."""
    data = json.loads(config.read_text())
    data["diffusion"]["num_inference_steps"] = 4
    (tmp_path / "inference.json").write_text(json.dumps(data))
    report = tmp_path / "bench.json"
    cli.main(["--config", str(tmp_path / "inference.json"), "--benchmark", "--warmup", "0", "--repeat", "1",
              "--cache-threshold", "1e9", "--report", str(report), "--prompt", "a cat"])
    got = json.loads(report.read_text())
    assert got["step_cache"] == {"threshold": 1e9, "skipped_steps": [1, 2], "skipped_fraction": 0.5}
    assert got["acceleration"] == {"cfg_parallel": False, "cache_threshold": 1e9, "compile": False,
                                   "compile_mode": "default", "parallel_vae_decode": False}
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(config), "--cfg-parallel", "--save-path", str(tmp_path / "o")])
    assert exc.value.code == 2
    data["acceleration"] = {"cache_threshold": -1}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        cli.main(["--config", str(tmp_path / "bad.json"), "--save-latents"])


def request_moves(argv: list[str], prompt: str) -> list[tuple[str, str, str]]:
    """Run `cli.main(argv)` under `sys.setprofile` and return how the request moves between the package's files:
    ("call", caller file, callee file) for every hand-off and ("back", callee file, caller file) for its return.

    A hand-off is a call made by (or into) `mindspeed_mm_osp/inference/` that passes a request value: `argv`, the
    parsed `InferenceArgs`, an `InferenceConfig` or one of its sections, the prompt text, or a list/tuple/dict holding
    one of them. Reading the request through its own methods and properties is not a hand-off. docs/inference.md
    gives the numbers this measures."""
    import dataclasses
    import sys

    import mindspeed_mm_osp
    from mindspeed_mm_osp.config import InferenceConfig
    from mindspeed_mm_osp.inference.arguments import InferenceArgs

    package = Path(mindspeed_mm_osp.__file__).resolve().parent
    root, layer = str(package), str(package / "inference") + "/"
    # Keyed by id but holding the object: a freed request value's id could be reused by an unrelated object.
    tracked, frames, moves = {id(argv): argv}, {}, []

    def track(value) -> None:
        tracked[id(value)] = value
        for f in dataclasses.fields(value):
            if dataclasses.is_dataclass(getattr(value, f.name)):
                track(getattr(value, f.name))

    def is_request(value, nested: bool = False) -> bool:
        if id(value) in tracked or (isinstance(value, str) and value == prompt):
            return True
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        return not nested and any(is_request(v, True) for v in list(items)[:64])

    def profile(frame, event, arg) -> None:
        code, caller = frame.f_code, frame.f_back
        if event == "return" and frame in frames:
            moves.append(("back", *reversed(frames.pop(frame))))
        if event == "return" and isinstance(arg, (InferenceArgs, InferenceConfig)):
            track(arg)
        if event != "call" or caller is None or not code.co_filename.startswith(root):
            return
        files = (str(Path(caller.f_code.co_filename).resolve()), code.co_filename)
        if not files[0].startswith(root) or not (files[0].startswith(layer) or files[1].startswith(layer)):
            return
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        values = [frame.f_locals[n] for n in names if n in frame.f_locals]
        if values and names[0] == "self" and id(values[0]) in tracked:
            values = values[1:]  # the request reading itself
        if any(is_request(v) for v in values):
            frames[frame] = tuple(str(Path(f).relative_to(package.parent)) for f in files)
            moves.append(("call", *frames[frame]))

    sys.setprofile(profile)
    try:
        cli.main(argv)
    finally:
        sys.setprofile(None)
    return [m for m in moves if m[1] != m[2]]


def path_numbers(moves: list[tuple[str, str, str]]) -> tuple[list[str], list[str], list[str]]:
    """(files entered, the file of each climb back up a layer, the file of each return to a file already left).
    A climb is a return to a file that then hands the request to a third file."""
    files, climbs, returns = [], [], []
    for i, (kind, src, dst) in enumerate(moves):
        if dst in files or src in files and dst == src:
            returns.append(dst)
        files += [f for f in (src, dst) if f not in files]
        after = moves[i + 1] if i + 1 < len(moves) else None
        if kind == "back" and after and after[0] == "call" and after[1] == dst and after[2] != src:
            climbs.append(dst)
    return files, climbs, returns


def test_the_runner_is_the_only_hub_of_a_request(config, tmp_path):
    """Following a prompt's arguments: inside the inference package only the runner gets them back from one file
    and hands them on to another; the CLI parses the flags and hands them to the runner once, the flag parser
    merges them into the config, and the building blocks (`pipeline`, `video_io`) hand nothing on."""
    prompt = "a cat on a red sofa"
    moves = request_moves(["--config", str(config), "--prompt", prompt, "--num-inference-steps", "1",
                           "--save-path", str(tmp_path / "out")], prompt)
    assert (tmp_path / "out" / "000000.mp4").is_file()
    files, climbs, returns = path_numbers(moves)
    runner, cli_file, arguments = (f"mindspeed_mm_osp/inference/{f}" for f in ("runner.py", "cli.py", "arguments.py"))
    assert {f for f in files if f.startswith("mindspeed_mm_osp/inference/")} == {
        cli_file, arguments, runner, "mindspeed_mm_osp/inference/pipeline.py", "mindspeed_mm_osp/inference/video_io.py"}
    assert sorted(set(climbs)) == [cli_file, runner] and climbs.count(cli_file) == 1
    assert {f for f in returns if f.startswith("mindspeed_mm_osp/inference/")} == {runner, cli_file, arguments}
