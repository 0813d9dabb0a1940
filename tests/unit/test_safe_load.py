"""The one pickle policy (checkpoint/safe_load.py, docs/security.md): our checkpoints load with no allow-list at
all, older ones with the named numpy allow-list, anything else is refused by name, and what libraries add to
torch's process-wide allow-list does not widen ours."""

import argparse
import random

import numpy as np
import pytest
import torch

from mindspeed_mm_osp.checkpoint import load_checkpoint, save_checkpoint
from mindspeed_mm_osp.checkpoint.layout import CheckpointError, model_file
from mindspeed_mm_osp.checkpoint.reader import read_rank_file
from mindspeed_mm_osp.checkpoint.safe_load import UntrustedPickleError, load_torch_file, trust_pickle


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3))


def test_our_checkpoint_needs_no_allow_list_and_restores_every_rng_bit_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal(1)  # leaves a cached Gaussian in numpy's state
    path = save_checkpoint(tmp_path, 3, _model(), args={"nested": {"t": (1, 2)}, "path": tmp_path})
    at_save = (random.random(), np.random.standard_normal(5), torch.rand(3))  # what the run draws next
    load_torch_file(path, "training checkpoint")  # allow=(): tensors and plain containers only
    random.seed(9)
    np.random.seed(9)
    loaded = load_checkpoint(tmp_path, _model())
    again = (random.random(), np.random.standard_normal(5), torch.rand(3))
    assert again[0] == at_save[0] and np.array_equal(again[1], at_save[1]) and torch.equal(again[2], at_save[2])
    assert loaded.args == {"nested": {"t": (1, 2)}, "path": str(tmp_path)}


def test_a_version_3_checkpoint_with_numpy_rng_state_still_resumes(tmp_path):
    """Before version 4 the numpy state was pickled as a tuple holding an ndarray: the named allow-list covers it."""
    save_checkpoint(tmp_path, 3, _model())
    path = model_file(tmp_path, 3, 0)
    (path.parent.parent / "manifest.json").unlink()  # an older version wrote none
    state = torch.load(path, weights_only=True)
    np.random.seed(5)
    legacy = np.random.get_state()
    expected = np.random.random(4)
    state["rng_state"][0]["np_rng_state"] = legacy
    torch.save(state, path)
    with pytest.raises(UntrustedPickleError, match="numpy"):
        load_torch_file(path, "training checkpoint")  # no allow-list: refused
    assert isinstance(read_rank_file(path, 1, 3).state["rng_state"][0]["np_rng_state"][1], np.ndarray)
    np.random.seed(0)
    load_checkpoint(tmp_path, _model())
    assert np.array_equal(np.random.random(4), expected)


def test_library_allow_lists_do_not_widen_ours_and_the_refusal_names_file_global_and_fix(tmp_path):
    import megatron.core  # noqa: F401 - adds argparse.Namespace (and more) to torch's process-wide list

    path = tmp_path / "model_ema.pt"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=1)}, path)
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    with pytest.raises(UntrustedPickleError) as err:
        load_torch_file(path, "weights file")
    message = str(err.value)
    assert message.startswith(f"{path}: refused") and "argparse.Namespace" in message
    assert f"--trust-pickle {path}" in message and "\n" not in message
    assert argparse.Namespace in torch.serialization.get_safe_globals()  # restored for the library
    trust_pickle([path])
    try:
        assert load_torch_file(path, "weights file")["args"].lr == 1
    finally:
        trust_pickle([])
    with pytest.raises(CheckpointError, match="--trust-pickle .*nope.pt: no such file"):
        trust_pickle([tmp_path / "nope.pt"])


def test_safe_load_is_the_only_unpickler_in_the_package():
    """Every torch file goes through the one policy: no other `torch.load` or `pickle.load(s)` in the package
    (the test harness's pickling of its own rank results, in testing/, is not a file from a user)."""
    from pathlib import Path

    import mindspeed_mm_osp

    root = Path(mindspeed_mm_osp.__file__).parent
    found = [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py"))
             if path.parts[-2] != "testing" and path.name != "safe_load.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "torch.load(" in line or "pickle.load" in line]
    assert not found, found
