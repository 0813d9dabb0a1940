"""Config loading: shipped JSONs round trip; every validation error names file, key and fix."""

import dataclasses
import json
import logging
import re
import types
import typing
from pathlib import Path

import pytest

from mindspeed_mm_osp.config import (
    ConfigError, DataConfig, InferenceConfig, ModelConfig, PredictorConfig, from_dict,
    load_data_config, load_inference_config, load_model_config, read_json, to_dict,
)
from mindspeed_mm_osp.config.loader import IGNORED_CONFIG_KEYS, strip_json_comments
from mindspeed_mm_osp.config.vae_training import VAETrainingConfig, load_vae_training_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.json"))
LOADERS = {"data": (load_data_config, DataConfig), "model": (load_model_config, ModelConfig),
           "inference": (load_inference_config, InferenceConfig),
           "autoencoder training": (load_vae_training_config, VAETrainingConfig)}


def kind_of(path: Path) -> str:
    name = path.name
    if name.startswith("data") or "dataset_param" in read_json(path):
        return "data"
    if "inference" in name or "pipeline_config" in read_json(path):
        return "inference"
    if read_json(path).get("train_autoencoder"):
        return "autoencoder training"
    return "model"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_round_trip(path, tmp_path):
    load, cls = LOADERS[kind_of(path)]
    cfg = load(path)
    dumped = tmp_path / "again.json"
    dumped.write_text(json.dumps(to_dict(cfg)))
    assert load(dumped) == cfg


def test_tiny_model_config_is_the_shipped_tiny_example():
    """`make_tiny_setup` builds this JSON in code (it must work from a wheel); the demo ships it as a file."""
    from mindspeed_mm_osp.testing import tiny_model_config

    shipped = read_json(ROOT / "examples" / "tiny" / "model.json")
    paths = {"vae": shipped["ae"]["from_pretrained"], "t5": shipped["text_encoder"]["from_pretrained"],
             "clip": shipped["text_encoder_2"]["from_pretrained"]}
    assert tiny_model_config(paths) == shipped


def _field_at(json_path: str):
    """The dataclass field a JSON path names, from the model, data or inference file's top level (or None)."""
    for cls in (ModelConfig, DataConfig, InferenceConfig):
        for key in json_path.split("."):
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            if key not in hints:
                break
            tp = hints[key]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            cls = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
        else:
            return cls
    return None


def test_ignored_keys_are_fields_and_documented():
    """Every key of the ignored-keys table is a real config key (so it is accepted, not warned about) and
    docs/configuration.md lists exactly the table's keys."""
    missing = [key for key in IGNORED_CONFIG_KEYS if _field_at(key) is None]
    assert not missing, f"not config keys: {missing}"
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = re.findall(r"^\| `([^`]+)` \|", doc.split("## Keys accepted and ignored", 1)[1], flags=re.M)
    assert documented == list(IGNORED_CONFIG_KEYS)


def test_comments_are_stripped_but_not_inside_strings():
    text = '{"a": 1, # comment with "quotes"\n "b": "x # not a comment", // another\n "c": "http://u"}'
    assert json.loads(strip_json_comments(text)) == {"a": 1, "b": "x # not a comment", "c": "http://u"}


def release_model(tmp_path, mutate):
    data = read_json(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json")
    mutate(data)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, key, words", [
    (lambda d: d["predictor"].pop("num_heads"), "predictor.num_heads", "required"),
    (lambda d: d["predictor"].update(num_heads="24"), "predictor.num_heads", "integer"),
    (lambda d: d["predictor"].update(sparse_n=[1, 2, 4]), "predictor.sparse_n", "one entry per stage"),
    (lambda d: d["predictor"].update(num_layers=[2, 4, 6, 8, 6, 4], sparse_n=[1, 2, 4, 8, 4, 2]), "predictor.num_layers", "odd"),
    (lambda d: d["predictor"].update(num_layers=[2, 4, 6, 8, 6, 4, 3]), "predictor.num_layers", "mirror"),
    (lambda d: d["predictor"].update(patch_size_t=2), "predictor.patch_size_t", "patch_size_t=1"),
    (lambda d: d["ae"].update(scale=[1.0] * 3), "ae.scale", "latent_dim=32"),
    (lambda d: d["diffusion"].update(weighting_scheme="logit-normal"), "diffusion.weighting_scheme", "did you mean 'logit_normal'"),
    (lambda d: d["predictor"].update(in_channels=16), "predictor.in_channels", "ae.latent_dim=32"),
    (lambda d: d.pop("predictor"), "predictor", "required"),
    (lambda d: d["predictor"].update(model_id="SparseUMMDiT_I2V"), "predictor.model_id", "SparseUMMDiTInpaint"),
    (lambda d: d["predictor"].update(model_id="SparseUMMDiTInpaint", vae_scale_factor_t=4),
     "predictor.vae_scale_factor_t", "ae.vae_scale_factor[0]=8"),
])
def test_model_validation_errors_name_file_key_and_fix(tmp_path, mutate, key, words):
    path = release_model(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_model_config(path)
    assert err.value.json_path == key
    assert str(path) in str(err.value)
    assert words in str(err.value)


def test_heads_not_divisible_by_tp():
    cfg = load_model_config(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json")
    cfg.predictor.validate_parallel(8)
    with pytest.raises(ConfigError, match=r"num_heads=24 .* divisible by --tensor-model-parallel-size=5"):
        cfg.predictor.validate_parallel(5, file="model.json")


def test_data_validation_errors(tmp_path):
    data = read_json(ROOT / "examples/opensoraplan1.5/data.json")
    data["dataset_param"]["preprocess_parameters"]["num_frames"] = 120
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"preprocess_parameters.num_frames: must be 8k\+1"):
        load_data_config(path)


def test_unknown_key_warns_with_did_you_mean(caplog):
    raw = read_json(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json")["predictor"]
    raw["num_head"] = 3
    with caplog.at_level(logging.WARNING):
        from_dict(PredictorConfig, raw, file="m.json", path="predictor")
    assert "predictor.num_head: unknown key" in caplog.text and "did you mean 'num_heads'" in caplog.text


def test_invalid_json_points_at_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n "a": 1,\n "b": \n}')
    with pytest.raises(ConfigError, match=r"bad.json: <root>: invalid JSON at line 4"):
        read_json(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        read_json("/nonexistent/model.json")
