"""load_wfvae_checkpoint: the four release layouts, .safetensors, and loud failures."""

import pytest
import torch
from safetensors.torch import save_file

from mindspeed_mm_osp.config import AEConfig, from_dict
from mindspeed_mm_osp.models.ae import (
    WFVAE,
    CheckpointKeyError,
    load_wfvae_checkpoint,
    tiny_ae_config_dict,
    write_tiny_wfvae,
)


def _model(seed: int) -> WFVAE:
    torch.manual_seed(seed)
    return WFVAE(from_dict(AEConfig, tiny_ae_config_dict(), path="ae"))


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return _model(seed=1).state_dict()


def _trainable(state):
    """What an EMA dict holds: no Haar constants."""
    return {k: v for k, v in state.items() if "wavelet_transform" not in k}


def _assert_loaded(model, state):
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


LAYOUTS = {
    "ema_state_dict": lambda sd: {
        "ema_state_dict": {f"module.{k}": v for k, v in _trainable(sd).items()},
        # A stale generator copy must lose to the EMA weights.
        "state_dict": {"gen_model": {k: torch.zeros_like(v) for k, v in sd.items()}},
        "epoch": 3,
    },
    "state_dict.gen_model": lambda sd: {"state_dict": {"gen_model": sd, "dics_model": {"d.weight": torch.ones(1)}},
                                        "ema_state_dict": {}},
    "state_dict": lambda sd: {"state_dict": sd},
    "raw": lambda sd: dict(sd),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(tmp_path, source, layout):
    path = tmp_path / "merged.ckpt"
    torch.save(LAYOUTS[layout](source), path)
    model = _model(seed=2)
    result = load_wfvae_checkpoint(model, path)
    assert result.source == layout
    _assert_loaded(model, _trainable(source) if layout == "ema_state_dict" else source)
    assert len(result.regenerated) == (48 if layout == "ema_state_dict" else 0)


def test_safetensors(tmp_path, source):
    path = tmp_path / "wfvae.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = _model(seed=2)
    assert load_wfvae_checkpoint(model, path).source == "raw"
    _assert_loaded(model, source)


def test_tiny_writer_round_trips(tmp_path):
    rng = torch.get_rng_state()
    path = write_tiny_wfvae(tmp_path, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the writer leaves the global RNG alone
    assert path.name == "merged.ckpt"
    model = _model(seed=2)
    assert load_wfvae_checkpoint(model, path).source == "ema_state_dict"
    _assert_loaded(model, _model(seed=5).state_dict())


def test_foreign_state_dict_is_rejected_by_name(tmp_path):
    path = tmp_path / "foreign.ckpt"
    foreign = {"model.diffusion.weight": torch.zeros(3), "encoder.down1.0.weight": torch.zeros(8, 24, 3, 3)}
    torch.save({"state_dict": foreign}, path)
    with pytest.raises(CheckpointKeyError) as err:
        load_wfvae_checkpoint(_model(seed=2), path)
    message = str(err.value)
    assert "unexpected: model.diffusion.weight" in message
    assert "203 missing: decoder.connect_l1.0.conv1.conv.bias" in message  # 252 - 48 Haar constants - 1 present


def test_missing_key_and_shape_mismatch(tmp_path, source):
    partial = dict(source)
    del partial["decoder.conv_out.weight"]
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    with pytest.raises(CheckpointKeyError, match=r"1 missing: decoder.conv_out.weight"):
        load_wfvae_checkpoint(_model(seed=2), path)
    model = _model(seed=2)
    load_wfvae_checkpoint(model, path, strict=False)  # explicit opt-out only
    _assert_loaded(model, partial)

    wrong = dict(source)
    wrong["encoder.conv_out.conv.bias"] = torch.zeros(3)
    torch.save(wrong, path)
    with pytest.raises(CheckpointKeyError, match=r"encoder.conv_out.conv.bias \(3,\) vs model \(8,\)"):
        load_wfvae_checkpoint(_model(seed=2), path, strict=False)


def test_training_checkpoint_with_pickled_objects_loads_only_when_trusted(tmp_path, source):
    """A checkpoint holding Python objects (here an argparse.Namespace) is refused, naming the file and the global,
    with no fallback to a full unpickle; it loads once the user trusts that one file (--trust-pickle)."""
    import argparse

    from mindspeed_mm_osp.checkpoint.safe_load import UntrustedPickleError, trust_pickle

    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": {"gen_model": source}, "sampler_state": argparse.Namespace(index=7)}, path)
    model = _model(seed=2)
    with pytest.raises(UntrustedPickleError, match=r"train.ckpt: .*argparse.Namespace.*--trust-pickle"):
        load_wfvae_checkpoint(model, path)
    trust_pickle([path])
    try:
        assert load_wfvae_checkpoint(model, path).source == "state_dict.gen_model"
    finally:
        trust_pickle([])
    _assert_loaded(model, source)
