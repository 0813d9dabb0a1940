"""Property-based fuzzing of the three JSON configs (model, data, inference; flags: test_bad_flags.py).

Every mutated input must either load (and then satisfy the invariants below, which the rest of the code relies
on) or fail with our own `ConfigError(file, json_path, ...)` naming the key. Any other exception (KeyError,
TypeError, ZeroDivisionError, ...) is a failure, and so is an accepted config that breaks an invariant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_mm_osp.config import ConfigError, load_data_config, load_inference_config, load_model_config
from mindspeed_mm_osp.config.loader import strip_json_comments
from mindspeed_mm_osp.config.dtypes import to_torch_dtype
from helpers import json_key_paths
from reliability_harness import log

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "model": ["examples/opensoraplan1.5/model_opensoraplan1_5.json", "examples/tiny/model.json"],
    "data": ["examples/opensoraplan1.5/data.json", "examples/tiny/data.json"],
    "inference": ["examples/opensoraplan1.5/inference_t2v_model1_5.json", "examples/tiny/inference.json"],
}
LOADERS: dict[str, Callable] = {"model": load_model_config, "data": load_data_config,
                                "inference": load_inference_config}


def _example(rel: str) -> dict:
    return json.loads(strip_json_comments((ROOT / rel).read_text()))


def _json_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# ------------------------------------------------------------------------------------------ invariants
# What the model, data and inference code rely on; an accepted config that breaks one crashes later with an
# unrelated error, or trains/samples garbage without a word. Keys the code never reads are not listed.


def _below(obj, minimum, *names) -> list[str]:
    return [f"{n} >= {minimum}" for n in names if getattr(obj, n) is not None and not getattr(obj, n) >= minimum]


def _dtype_ok(name) -> bool:
    try:
        to_torch_dtype(name)
        return True
    except ValueError:
        return False


def _predictor_violations(p) -> list[str]:
    bad = _below(p, 1, "num_heads", "in_channels", "timestep_embed_dim", "caption_channels",
                 "pooled_projection_dim", "patch_size", "out_channels") + _below(p, 16, "head_dim")
    n = len(p.num_layers)
    if n != len(p.sparse_n) or n % 2 == 0 or min(p.num_layers) < 1 or min(p.sparse_n) < 1 or \
            tuple(p.num_layers[: n // 2]) != tuple(reversed(p.num_layers[n // 2 + 1:])) or p.head_dim % 16:
        bad.append("predictor stages odd, mirrored, positive; head_dim % 16 == 0")
    if not 0.0 <= p.dropout < 1.0:
        bad.append("dropout in [0, 1)")
    if not (p.norm_eps > 0 and math.isfinite(p.norm_eps)):
        bad.append("norm_eps finite > 0")
    return bad


def _ae_violations(ae, predictor) -> list[str]:
    bad = _below(ae, 1, "latent_dim", "base_channels")
    if ae.latent_dim != predictor.in_channels:
        bad.append("ae.latent_dim == predictor.in_channels")
    for key in ("scale", "shift"):
        v = getattr(ae, key)
        if v is not None and (len(v) != ae.latent_dim or not all(math.isfinite(x) for x in v)):
            bad.append("ae.scale/shift: latent_dim finite values")
    if ae.tile_latent_frames < 0 or ae.encode_tile_latent_frames < 0:
        bad.append("ae tiles >= 0")
    if min(ae.vae_scale_factor) < 1:
        bad.append("vae_scale_factor >= 1")
    if not _dtype_ok(ae.dtype):
        bad.append("ae.dtype known")
    return bad


def _diffusion_violations(d) -> list[str]:
    if d.num_inference_steps < 1 or not d.shift > 0 or not d.logit_std > 0 or not d.max_image_seq > d.base_image_seq \
            or not 0 <= d.guidance_rescale <= 1 or not 0 <= d.sigma_eps <= 1e-2:
        return ["diffusion ranges"]
    return []


def model_violations(cfg) -> list[str]:
    bad = _predictor_violations(cfg.predictor) + _diffusion_violations(cfg.diffusion)
    if cfg.ae is not None:
        bad += _ae_violations(cfg.ae, cfg.predictor)
    if not _dtype_ok(cfg.weight_dtype):
        bad.append("weight_dtype known")
    return bad


def data_violations(cfg) -> list[str]:
    prep = cfg.dataset_param.preprocess_parameters
    cp = cfg.dataloader_param.collate_param
    bad = _below(prep, 1, "num_frames", "ae_stride_t", "train_fps", "sp_size")
    bad += _below(cp, 1, "patch_size", "patch_size_t", "ae_stride") + _below(cfg.dataset_param, 1, "model_max_length")
    bad += _below(prep, 0, "max_read_retries") + _below(cfg.dataloader_param, 0, "num_workers")
    if prep.ae_stride_t >= 1 and (prep.num_frames - 1) % prep.ae_stride_t or not 0 <= prep.cfg <= 1:
        bad.append("num_frames = k*ae_stride_t+1, cfg in [0, 1]")
    if not prep.min_h_div_w_ratio <= prep.max_h_div_w_ratio:
        bad.append("min_h_div_w_ratio <= max_h_div_w_ratio")
    if prep.force_resolution and (prep.max_height < 16 or prep.max_width < 16 or prep.max_height % 16 or prep.max_width % 16):
        bad.append("max_height/max_width positive multiples of 16")
    if not prep.force_resolution and (prep.hw_stride < 16 or prep.hw_stride % 16 or not prep.max_hxw or prep.max_hxw < 1):
        bad.append("hw_stride, max_hxw positive")
    if not (prep.speed_factor > 0 and math.isfinite(prep.speed_factor)):
        bad.append("speed_factor finite > 0")
    if cp.num_frames != prep.num_frames or cp.ae_stride_t != prep.ae_stride_t:
        bad.append("collate matches preprocess")
    return bad


def inference_violations(cfg) -> list[str]:
    bad = _predictor_violations(cfg.predictor) + _ae_violations(cfg.ae, cfg.predictor)
    bad += _diffusion_violations(cfg.diffusion)
    frames, height, width = cfg.pipeline_config.input_size
    if frames < 1 or (frames - 1) % 8 or height < 16 or width < 16 or height % 16 or width % 16:
        bad.append("input_size: 8k+1 frames, positive multiples of 16")
    bad += _below(cfg, 1, "micro_batch_size", "fps", "frame_interval", "model_max_length")
    if not _dtype_ok(cfg.weight_dtype):
        bad.append("weight_dtype known")
    return bad


VIOLATIONS = {"model": model_violations, "data": data_violations, "inference": inference_violations}

# ------------------------------------------------------------------------------------------- mutations

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 7, 15, 17, 1 << 40]), st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "bf16", "banana", "nearest"]),
    st.text(max_size=8), st.lists(st.integers(-3, 9), max_size=8), st.builds(dict), st.builds(lambda: {"x": 1}),
)  # fresh dicts: a later mutation of the same case may rename a key inside one (st.just would share it)


def _apply(doc: dict, mutation: tuple) -> None:
    op, path, value = mutation
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    if op == "replace" or isinstance(parent, list):
        parent[key] = value
    elif op == "delete":
        del parent[key]
    else:  # a misspelt key
        parent[f"{key}x"] = parent.pop(key)


@st.composite
def mutations(draw, kind: str):
    """(example file, [(op, key path, value), ...]): 1-3 replaced values, deleted or misspelt keys."""
    rel = draw(st.sampled_from(EXAMPLES[kind]))
    doc = _example(rel)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        paths = json_key_paths(doc)
        if not paths:  # everything was deleted already
            break
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "typo"]))
        mutation = (op, path, draw(JSON_VALUES) if op == "replace" else None)
        _apply(doc, mutation)
        done.append(mutation)
    return rel, done


# Invalid values the loaders once accepted (found by this fuzzer, fixed; docs/reliability.md): each must now be
# rejected with a ConfigError naming its key. name -> (kind, example file, key path, the invalid value)
_OSP = "examples/opensoraplan1.5/"
REGRESSIONS: dict[str, tuple] = {
    "head_dim >= 16": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "head_dim"), 0),
    "timestep_embed_dim >= 1": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "timestep_embed_dim"), 0),
    "caption_channels >= 1": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "caption_channels"), -1),
    "pooled_projection_dim >= 1": ("model", _OSP + "model_opensoraplan1_5.json",
                                   ("predictor", "pooled_projection_dim"), 0),
    "out_channels >= 1": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "out_channels"), 0),
    "dropout in [0, 1)": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "dropout"), 1.5),
    "norm_eps finite > 0": ("model", _OSP + "model_opensoraplan1_5.json", ("predictor", "norm_eps"), -1e-6),
    "base_channels >= 1": ("model", _OSP + "model_opensoraplan1_5.json", ("ae", "base_channels"), 0),
    "vae_scale_factor >= 1": ("inference", _OSP + "inference_t2v_model1_5.json", ("ae", "vae_scale_factor", 0), 0),
    "ae.scale/shift: latent_dim finite values": ("model", _OSP + "model_opensoraplan1_5.json", ("ae", "scale", 3),
                                                 float("nan")),
    "weight_dtype known": ("model", _OSP + "model_opensoraplan1_5.json", ("weight_dtype",), "banana"),
    "input_size: 8k+1 frames, positive multiples of 16": ("inference", _OSP + "inference_t2v_model1_5.json",
                                                          ("pipeline_config", "input_size", 1), 0),
    "model_max_length >= 1": ("data", _OSP + "data.json", ("dataset_param", "model_max_length"), 0),
    "ae_stride >= 1": ("data", _OSP + "data.json", ("dataloader_param", "collate_param", "ae_stride"), 0),
    "patch_size >= 1": ("data", _OSP + "data.json", ("dataloader_param", "collate_param", "patch_size"), 0),
    "patch_size_t >= 1": ("data", _OSP + "data.json", ("dataloader_param", "collate_param", "patch_size_t"), 0),
    "num_workers >= 0": ("data", _OSP + "data.json", ("dataloader_param", "num_workers"), -1),
    "max_height/max_width positive multiples of 16": ("data", _OSP + "data.json",
                                                      ("dataset_param", "preprocess_parameters", "max_height"), 0),
    "speed_factor finite > 0": ("data", _OSP + "data.json",
                                ("dataset_param", "preprocess_parameters", "speed_factor"), 0.0),
}
REGRESSIONS["ae_stride_t >= 1 (was a ZeroDivisionError)"] = (
    "data", _OSP + "data.json", ("dataset_param", "preprocess_parameters", "ae_stride_t"), 0)


def _load(kind: str, doc: dict, tmp_dir: Path):
    path = tmp_dir / f"fuzz_{kind}.json"
    path.write_text(json.dumps(doc))  # NaN/Infinity written as JSON's extension, which users can type too
    return path, LOADERS[kind](path)


def _check(kind: str, rel: str, done: list, tmp_dir: Path, stats: dict) -> None:
    doc = _example(rel)
    for mutation in done:
        _apply(doc, mutation)
    try:
        path, cfg = _load(kind, doc, tmp_dir)
    except ConfigError as e:
        assert e.file.endswith(f"fuzz_{kind}.json") and e.json_path != "<root>" and e.message, (rel, done, e)
        stats["rejected"] += 1
        return
    stats["accepted"] += 1
    violations = VIOLATIONS[kind](cfg)
    assert not violations, f"{rel} with {done} loads but breaks {violations}"


@pytest.fixture(scope="module")
def fuzz_stats():
    stats = {k: {"accepted": 0, "rejected": 0} for k in EXAMPLES}
    yield stats
    log(f"config fuzzing (accepted and valid / rejected with ConfigError): {stats}")


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_mutated_json_loads_or_fails_with_config_error(kind, tmp_path_factory, fuzz_stats):
    tmp_dir = tmp_path_factory.mktemp(f"fuzz_{kind}")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutations(kind))
    def run(case):
        rel, done = case
        _check(kind, rel, done, tmp_dir, fuzz_stats[kind])

    run()


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fixed_invalid_value_is_rejected(name, tmp_path):
    kind, rel, path, value = REGRESSIONS[name]
    doc = _example(rel)
    _apply(doc, ("replace", path, value))
    with pytest.raises(ConfigError) as e:
        _load(kind, doc, tmp_path)
    assert e.value.json_path == _json_path(path) or e.value.json_path.startswith(_json_path(path[:-1]))
