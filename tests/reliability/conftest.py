import json

import pytest


@pytest.fixture(scope="session")
def micro_assets(tiny_assets):
    """`tiny_assets` with a 3-block predictor: the same code paths, a 2 MB checkpoint, ~1 s per run."""
    cfg = json.loads(tiny_assets["model_json"].read_text())
    cfg["predictor"].update(num_layers=[1, 1, 1], sparse_n=[1, 2, 1], num_heads=2)
    path = tiny_assets["root"] / "model_micro.json"
    path.write_text(json.dumps(cfg, indent=2))
    return {**tiny_assets, "model_json": path}
