"""The release models' state-dict keys, shapes and parameter counts against the reference's own
(tests/golden/*_release_keys.json, see the README there), built on `meta` from the release config blocks.

A released `model_ema.pt` or WF-VAE checkpoint loads strictly only if these agree exactly.
"""

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.ae import AEConfig
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.ae import WFVAE
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict
from golden.reference import read_json


def _shapes(state_dict) -> dict:
    return {k: list(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("block, variant, text_params", [
    ("predictor_config", "tp1_without_final_block_text_params", False),
    ("training_json_predictor_config", "tp_gt1_with_final_block_text_params", True)])
def test_predictor_release_keys(block, variant, text_params):
    """Both release JSONs (inference and training) give the same layout; the final block's text parameters exist
    in the reference only when it was built at TP > 1, as the release was."""
    golden = read_json("predictor_release_keys.json")
    config = from_dict(PredictorConfig, {**golden[block], "final_block_text_params": text_params},
                       file="predictor_release_keys.json", path=block)
    with torch.device("meta"):
        model = SparseUMMDiT(config)
    expected = golden["variants"][variant]
    assert _shapes(local_state_dict(model)) == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["parameter_count"]


def test_wfvae_release_keys():
    golden = read_json("vae_release_keys.json")
    with torch.device("meta"):
        vae = WFVAE(from_dict(AEConfig, golden["ae"], file="vae_release_keys.json", path="ae"))
    state_dict = vae.state_dict()
    assert _shapes(state_dict) == golden["keys"]
    assert sorted(name for name, _ in vae.named_buffers()) == sorted(golden["buffer_keys"])
    frozen = sorted(name for name, p in vae.named_parameters() if not p.requires_grad)
    assert frozen == sorted(golden["frozen_haar_parameter_keys"])
    assert sum(p.numel() for p in vae.parameters()) == golden["parameter_count"]
    assert sum(p.numel() for p in vae.parameters() if p.requires_grad) == golden["trainable_parameter_count"]
    assert sum(v.numel() for v in state_dict.values()) == golden["state_dict_element_count"]
