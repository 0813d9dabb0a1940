"""Reading the reference outputs stored here (see README.md): tests import it as `from golden.reference import ...`
(`tests/` is on sys.path because `tests/conftest.py` lives there)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).resolve().parent


def read_json(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def read_reference(stem: str, tmp_dir: Path) -> tuple[dict, dict, Path]:
    """(`<stem>.json`, every tensor of `<stem>.safetensors`, its `param.*` tensors written under `tmp_dir` as a plain
    weights file): the parameters reach the model through our own checkpoint loaders, as released weights would."""
    tensors = load_file(str(GOLDEN / f"{stem}.safetensors"))
    weights = tmp_dir / f"{stem}_weights.safetensors"
    save_file({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, str(weights))
    return read_json(f"{stem}.json"), tensors, weights
