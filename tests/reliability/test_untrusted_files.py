"""Files from strangers (docs/security.md): a planted pickle payload never runs, through every entry point a user
hands a file to, and a damaged checkpoint is refused by name before it is trained on or converted.

The payload is a `__reduce__` that would create a marker file when unpickled. Each kind of file a user can give us
carries it: a training checkpoint's rank file (resume, LoRA adapters, converter), a Megatron `distrib_optim.pt`, a
released-style `model_ema.pt` and a WF-VAE `merged.ckpt`. (Feature-cache shards are safetensors plus JSON: nothing
there is unpickled.)
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import cli as convert_cli
from mindspeed_mm_osp.checkpoint.layout import CheckpointError, model_file, tracker_path
from mindspeed_mm_osp.testing.checkpoints import write_training_checkpoint
from reliability_harness import cli_main, run_ranks, train, train_argv

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs `open(marker, 'w')`: the file only appears if a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted pickle payload ran"


def _pretrain(argv: list[str]) -> dict:
    ok, out = run_ranks(_pretrain_rank, 1, argv)[0]
    assert ok, out
    return out


def _pretrain_rank(rank, world_size, argv):
    return cli_main(argv)


def _assert_refused(code: int, stderr: str, *expected: str) -> str:
    """Exit 2, no traceback, and the last line (the error) names everything in `expected`."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert "error" in line and all(e in line for e in expected), line
    return line


def _convert(capsys, *argv) -> tuple[int, str]:
    """`convert_mm_to_ckpt.py ARGV` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        convert_cli([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _plant_checkpoint(root: Path, marker: Path, lora: dict | None = None) -> Path:
    """A checkpoint in the Megatron layout (as an older version or another tool wrote it) whose rank file holds
    the payload in its `args`."""
    weights = {"w": torch.ones(2, 2)}
    write_training_checkpoint(root, weights, weights, tp=1, iteration=3)
    path = model_file(root, 3, 0)
    state = torch.load(path, weights_only=True)
    state["args"] = Payload(marker)
    if lora is not None:
        state["lora"] = lora
    torch.save(state, path)
    return path


def _micro_weights(micro_assets, path: Path) -> Path:
    """Random predictor weights of the micro model (merged safetensors), a valid base for LoRA."""
    from safetensors.torch import save_file

    from mindspeed_mm_osp.config import PredictorConfig, from_dict
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict

    cfg = json.loads(micro_assets["model_json"].read_text())["predictor"]
    save_file(local_state_dict(SparseUMMDiT(from_dict(PredictorConfig, cfg))), str(path))
    return path


def _model_json(micro_assets, tmp_path: Path, block: str, weights: Path) -> Path:
    cfg = json.loads(micro_assets["model_json"].read_text())
    cfg[block]["from_pretrained"] = str(weights)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------------------- planted payloads


def test_checkpoint_rank_file_through_resume_and_converter(micro_assets, tmp_path, marker, capsys):
    path = _plant_checkpoint(tmp_path / "ckpt", marker)
    out = _pretrain(train_argv(micro_assets, "--load", str(tmp_path / "ckpt")))
    _assert_refused(out["code"], out["stderr"], str(path), "builtins.exec", "--trust-pickle")
    code, err = _convert(capsys, "--load_dir", tmp_path / "ckpt", "--save_dir", tmp_path / "out")
    _assert_refused(code, err, str(path), "builtins.exec", "--trust-pickle")
    assert not (tmp_path / "out").exists()


def test_lora_adapter_checkpoint_through_lora_load_and_lora_merge(micro_assets, tmp_path, marker, capsys):
    path = _plant_checkpoint(tmp_path / "adapters", marker, lora={"config": {}, "base": {}})
    base = _micro_weights(micro_assets, tmp_path / "base.safetensors")
    out = _pretrain(train_argv(micro_assets, "--lora-r", "2", "--load", str(base), "--lora-load",
                               str(tmp_path / "adapters")))
    _assert_refused(out["code"], out["stderr"], str(path), "builtins.exec")
    code, err = _convert(capsys, "--load_dir", tmp_path / "adapters", "--save_dir", tmp_path / "out",
                         "--lora-merge", "--base", base)
    _assert_refused(code, err, str(path), "builtins.exec")


def test_distrib_optim_file_is_never_opened(tmp_path, marker, capsys):
    """A Megatron distributed-optimizer shard next to the rank file: no loader reads it, so it cannot run."""
    weights = {"w": torch.ones(2, 2)}
    write_training_checkpoint(tmp_path / "ckpt", weights, weights, tp=1, iteration=3)
    torch.save({"param_state": Payload(marker)}, model_file(tmp_path / "ckpt", 3, 0).parent / "distrib_optim.pt")
    code, err = _convert(capsys, "--load_dir", tmp_path / "ckpt", "--save_dir", tmp_path / "out", "--format", "pt")
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "out" / "model.pt", weights_only=True)["w"], weights["w"])


def test_released_model_ema_through_inference_and_from_pretrained(micro_assets, tmp_path, marker, capsys):
    from mindspeed_mm_osp.inference import cli as inference_cli

    weights = tmp_path / "model_ema.pt"
    torch.save({"transformer_blocks.0.w": torch.zeros(1), "extra": Payload(marker)}, weights)
    model_json = _model_json(micro_assets, tmp_path, "predictor", weights)
    out = _pretrain(train_argv({**micro_assets, "model_json": model_json}))
    _assert_refused(out["code"], out["stderr"], str(weights), "builtins.exec")
    config = json.loads((REPO / "examples/tiny/inference.json").read_text())
    models = micro_assets["models"]
    for key, folder in (("ae", "vae"), ("text_encoder", "t5"), ("tokenizer", "t5"), ("text_encoder_2", "clip"),
                        ("tokenizer_2", "clip")):
        config[key]["from_pretrained"] = str(models[folder])
    config["predictor"]["from_pretrained"] = str(weights)
    (tmp_path / "inference.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        inference_cli.main(["--config", str(tmp_path / "inference.json"), "--predictor-weights", str(weights),
                            "--prompt", "a cat", "--save-path", str(tmp_path / "videos")])
    _assert_refused(exc.value.code, capsys.readouterr().err, str(weights), "builtins.exec")


def test_wfvae_checkpoint_through_model_json_and_reconstruct_video(micro_assets, tmp_path, marker, capsys):
    from mindspeed_mm_osp.checkpoint.safe_load import load_torch_file
    from mindspeed_mm_osp.tools import reconstruct_video

    vae = tmp_path / "merged.ckpt"
    release = load_torch_file(micro_assets["models"]["vae"], "WF-VAE checkpoint")
    torch.save({**release, "sampler_state": Payload(marker)}, vae)
    model_json = _model_json(micro_assets, tmp_path, "ae", vae)
    out = _pretrain(train_argv({**micro_assets, "model_json": model_json}))
    _assert_refused(out["code"], out["stderr"], str(vae), "builtins.exec")
    capsys.readouterr()
    video = next((micro_assets["root"] / "data").rglob("*.mp4"))
    with pytest.raises(SystemExit) as exc:
        reconstruct_video.main(["--model-config", str(model_json), "--data", str(video), "--num-frames", "9",
                                "--size", "32", "32", "--out", str(tmp_path / "recon")])
    _assert_refused(exc.value.code, capsys.readouterr().err, str(vae), "builtins.exec", "--trust-pickle")


def test_trust_pickle_opts_in_for_the_named_file_only(tmp_path, capsys):
    """An old checkpoint whose `args` is an argparse.Namespace (a harmless but not allow-listed global): refused,
    then converted once each rank file is named with --trust-pickle; the result loads without any opt-in."""
    import argparse

    from mindspeed_mm_osp.checkpoint.reader import read_checkpoint
    from mindspeed_mm_osp.checkpoint.safe_load import trust_pickle

    weights = {"w": torch.arange(4.0).reshape(2, 2)}
    write_training_checkpoint(tmp_path / "old", weights, weights, tp=2, iteration=3)
    files = [model_file(tmp_path / "old", 3, r) for r in range(2)]
    for path in files:
        torch.save({**torch.load(path, weights_only=True), "args": argparse.Namespace(lr=1e-4)}, path)
    code, err = _convert(capsys, "--load_dir", tmp_path / "old", "--save_dir", tmp_path / "new", "--target-tp", "2",
                         "--trust-pickle", files[0])
    _assert_refused(code, err, str(files[1]), "argparse.Namespace")
    code, err = _convert(capsys, "--load_dir", tmp_path / "old", "--save_dir", tmp_path / "new", "--target-tp", "2",
                         "--trust-pickle", files[0], "--trust-pickle", files[1])
    assert code == 0, err
    trust_pickle([])
    assert torch.equal(read_checkpoint(tmp_path / "new", verify=True).ranks[1].weights("model")["w"], weights["w"])


# ------------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved_run(micro_assets, tmp_path_factory) -> Path:
    """A checkpoint root written by pretrain.py: iterations 1 and 2, each with its manifest."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    ok, out = run_ranks(train, 1, train_argv(micro_assets, "--save", str(root), "--save-interval", "1"))[0]
    assert ok, out
    assert tracker_path(root).read_text() == "2"
    return root


def _damage(root: Path, how: str) -> Path:
    path = model_file(root, 2, 0)
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_damaged_checkpoint_is_refused_by_name_on_resume_and_convert(micro_assets, saved_run, tmp_path, how, capsys):
    root = tmp_path / "ckpt"
    shutil.copytree(saved_run, root)
    path = _damage(root, how)
    out = _pretrain(train_argv(micro_assets, "--load", str(root), "--verify-checkpoint", "--train-iters", "3"))
    _assert_refused(out["code"], out["stderr"], str(path), "is 1")
    code, err = _convert(capsys, "--load_dir", root, "--save_dir", tmp_path / "out")
    line = _assert_refused(code, err, str(path), "is 1 (--ckpt-step 1")
    assert ("checksum" if how == "flipped" else "truncated") in line
    assert not (tmp_path / "out").exists()


def test_good_checkpoint_verifies_and_its_merged_file_carries_a_checksum(saved_run, tmp_path, capsys):
    from safetensors import safe_open

    from mindspeed_mm_osp.checkpoint.reader import TENSORS_CHECKSUM_KEY, load_weights
    from mindspeed_mm_osp.checkpoint.manifest import tensors_checksum

    code, err = _convert(capsys, "--load_dir", saved_run, "--save_dir", tmp_path / "out", "--format", "safetensors")
    assert code == 0, err
    merged = tmp_path / "out" / "model.safetensors"
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()[TENSORS_CHECKSUM_KEY] == tensors_checksum(load_weights(merged, verify=True))
    data = bytearray(merged.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes
    merged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor checksum .* differs"):
        load_weights(merged, verify=True)
