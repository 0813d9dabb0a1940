"""SparseUMMDiT against the reference implementation's own outputs (tests/golden, see its README).

The tiny reference predictor's parameters go through our weight loader (`load_predictor_weights`) and builder
(`build_predictor`) from its model-JSON `predictor` block; its output must match the reference to 1e-5, with
skiparse and all-dense. The rest of the suite compares our code with itself (layouts, sparse against dense); only
these tests would notice a bug that every layout shares (a RoPE, timestep, adaLN or skiparse-pattern slip) and that
would break every released checkpoint. On a failure the message names the first block whose output leaves the
reference's per-block trace.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm_osp.checkpoint.weights import load_predictor_weights
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.predictor import build_predictor
from golden.reference import GOLDEN, read_reference

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Config, inputs, outputs and trace of the reference run; its parameters written as a plain weights file."""
    meta, tensors, weights = read_reference("predictor_tiny", tmp_path_factory.mktemp("golden_predictor"))
    return {"config": from_dict(PredictorConfig, meta["predictor"], file="predictor_tiny.json", path="predictor"),
            "weights": weights, "inputs": {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")},
            "outputs": tensors, "trace": load_file(str(GOLDEN / "predictor_tiny_trace.safetensors")),
            "state_dict": meta["state_dict"]}


def _model(golden, sparse1d: bool):
    config = dataclasses.replace(golden["config"], sparse1d=sparse1d)
    return build_predictor(config, load_predictor_weights(golden["weights"]), torch.float32, torch.device("cpu"))


def _first_divergence(model, golden) -> str:
    """The first block (execution order) whose video or text output differs from the reference trace by more
    than ATOL, or 'none'. Also checks the conditioning vector, which every block reads."""
    trace, outputs, hooks = golden["trace"], {}, []
    for s, stage in enumerate(model.transformer_blocks):
        for i, block in enumerate(stage):
            def keep(module, args, out, name=f"{s}.{i}"):
                outputs[name] = out
            hooks.append(block.register_forward_hook(keep))
    try:
        with torch.no_grad():
            temb = model.time_text_embed(golden["inputs"]["timestep"], golden["inputs"]["pooled_projections"][:, 0])
            model(**golden["inputs"])
    finally:
        for hook in hooks:
            hook.remove()
    if not torch.allclose(temb, trace["trace.embedded_timestep"], rtol=0, atol=ATOL):
        return "time_text_embed (timestep/pooled-text conditioning)"
    for name, (x, c) in outputs.items():
        for stream, ours in (("hidden_states", x), ("encoder_hidden_states", c)):
            ref = trace[f"trace.block.{name}.{stream}"]
            if not torch.allclose(ours, ref, rtol=0, atol=ATOL):
                return (f"transformer_blocks.{name} ({stream}: max |diff| "
                        f"{(ours - ref).abs().max().item():.3g})")
    return "none"


def test_state_dict_keys_and_shapes_are_the_reference_ones(golden):
    model = _model(golden, sparse1d=True)
    sd = model.state_dict()
    expected = golden["state_dict"]
    assert {k: list(v.shape) for k, v in sd.items()} == expected["shapes"]  # order free: loading is by name
    assert sum(p.numel() for p in model.parameters()) == expected["parameter_count"]


def test_every_block_follows_the_reference_trace(golden):
    """Hidden states after each block of the skiparse run equal the reference's (first differing block named)."""
    divergence = _first_divergence(_model(golden, sparse1d=True), golden)
    assert divergence == "none", f"first block off the reference trace: {divergence}"


@pytest.mark.parametrize("sparse1d", [True, False], ids=["sparse", "dense"])
def test_output_matches_the_reference(golden, sparse1d):
    """Velocity prediction of the reference, incl. its video/text masks, within 1e-5 (measured: bitwise equal)."""
    model = _model(golden, sparse1d)
    with torch.no_grad():
        out = model(**golden["inputs"])
    ref = golden["outputs"]["output.sparse" if sparse1d else "output.dense"]
    diff = (out - ref).abs().max().item()
    if diff > ATOL:
        pytest.fail(f"max |ours - reference| = {diff:.3g} > {ATOL}; first block off the reference trace "
                    f"(skiparse run): {_first_divergence(_model(golden, sparse1d=True), golden)}")
