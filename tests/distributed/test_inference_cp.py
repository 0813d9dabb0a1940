"""inference.py with Ulysses context parallelism, alone and with TP, gives the CP=1 latents."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm_osp.inference import cli
from mindspeed_mm_osp.inference.pipeline import load_latents
from mindspeed_mm_osp.testing import run_distributed
from helpers import infer_on_rank, make_tiny_inference

pytestmark = pytest.mark.slow


def test_cp2_and_tp2_cp2_inference_equal_cp1(tmp_path):
    config = make_tiny_inference(tmp_path / "assets")
    base = ["--config", str(config), "--save-latents"]
    cli.main([*base, "--save-path", str(tmp_path / "cp1")])
    run_distributed(infer_on_rank, 2, [*base, "--context-parallel-size", "2", "--save-path",
                                       str(tmp_path / "cp2")], cp=2, timeout=300)
    run_distributed(infer_on_rank, 4, [*base, "--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                       "--context-parallel-algo", "ulysses_cp_algo", "--save-path",
                                       str(tmp_path / "tp2cp2")], tp=2, cp=2, timeout=300)
    for stem in ("000000", "000001"):
        ref = load_latents(tmp_path / "cp1" / f"{stem}.safetensors")
        for other, (tp, cp) in {"cp2": (1, 2), "tp2cp2": (2, 2)}.items():
            got = load_latents(tmp_path / other / f"{stem}.safetensors")
            torch.testing.assert_close(got.latents, ref.latents, rtol=1e-4, atol=1e-4)
            assert got.record["tensor_model_parallel_size"] == tp
            assert got.record["context_parallel_size"] == cp
    # one writer per file: CP peers do not write
    assert sorted(p.name for p in (tmp_path / "tp2cp2").iterdir()) == ["000000.safetensors", "000001.safetensors"]


def test_unknown_context_parallel_algo_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", "unused.json", "--context-parallel-size", "2", "--context-parallel-algo",
                  "megatron_cp_algo"])
    assert exc.value.code == 2
    assert "megatron_cp_algo" in capsys.readouterr().err
