"""`--compile`: blocks through torch.compile equal eager (1e-4); a backend that cannot compile falls back to eager
with a warning instead of failing the run."""

import logging
import shutil

import pytest
import torch

from mindspeed_mm_osp.inference.compile import compile_blocks
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.testing import tiny_predictor_config



def _model_and_inputs():
    torch.manual_seed(0)
    model = SparseUMMDiT(tiny_predictor_config(num_layers=[1], sparse_n=[1])).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([900.0, 250.0]),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 6, [1] * 3 + [0] * 3]),
                  pooled_projections=torch.randn(2, 16, generator=g))
    return model, inputs


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


@pytest.mark.slow  # ~10 s of dynamo tracing
@torch.no_grad()
def test_backend_failure_falls_back_to_eager_with_a_warning(caplog):
    model, inputs = _model_and_inputs()
    eager = model(**inputs)
    wrappers = compile_blocks(model, backend=_broken_backend)
    with caplog.at_level(logging.WARNING, logger="mindspeed_mm_osp.inference.compile"):
        out = model(**inputs)
    assert torch.equal(out, eager)
    assert [w.active for w in wrappers] == [False]
    assert "torch.compile failed for SparseMMDiTBlock" in caplog.text


def test_every_block_fits_in_dynamo_cache():
    """Each block is a separate dynamo cache entry of the same code object: the limit must cover them all."""
    torch.manual_seed(0)
    model = SparseUMMDiT(tiny_predictor_config(num_layers=[5, 4, 5], sparse_n=[1, 1, 1])).eval()
    compile_blocks(model)
    assert torch._dynamo.config.recompile_limit >= len(model.blocks()) == 14


def test_unknown_mode_is_rejected():
    model, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_blocks(model, mode="fastest")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler (g++/c++ not on PATH)")
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@torch.no_grad()
def test_compiled_blocks_equal_eager(mode):
    model, inputs = _model_and_inputs()
    eager = model(**inputs)
    wrappers = compile_blocks(model, mode=mode)
    torch.testing.assert_close(model(**inputs), eager, rtol=1e-4, atol=1e-4)
    assert all(w.active for w in wrappers)
