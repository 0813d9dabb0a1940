import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA (scripts/device_check.sh runs them); elsewhere they are skipped."""
    from mindspeed_mm_osp import platform

    if platform.accelerator() == "cuda":
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device (this run: {platform.accelerator()})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The test tensors are tiny: intra-op threads only add overhead (10-100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny WF-VAE/T5/CLIP folders, the synthetic dataset, and tiny data/model JSONs pointing at them."""
    from mindspeed_mm_osp.testing import tiny_model_config
    from mindspeed_mm_osp.tools.make_synthetic_dataset import make_synthetic_dataset
    from mindspeed_mm_osp.tools.make_tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    models = make_tiny_models(root / "models")
    data = make_synthetic_dataset(root / "data")
    model_cfg = tiny_model_config(models)
    data_cfg = json.loads((ROOT / "examples/tiny/data.json").read_text())
    data_cfg["dataset_param"]["basic_parameters"]["data_path"] = str(data.data_txt)
    data_cfg["dataset_param"]["tokenizer_config"]["from_pretrained"] = str(models["t5"])
    data_cfg["dataset_param"]["tokenizer_config_2"]["from_pretrained"] = str(models["clip"])
    (root / "model.json").write_text(json.dumps(model_cfg, indent=2))
    (root / "data.json").write_text(json.dumps(data_cfg, indent=2))
    return {"root": root, "model_json": root / "model.json", "data_json": root / "data.json", "models": models,
            "data": data}
