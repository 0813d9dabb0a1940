"""JSON (with `#` comments) into frozen, typed dataclasses, validated once.

Users paste configs from the reference README, which carries `# ...` comments after
values, so comments outside strings are stripped before parsing. Every error names the
file, the JSON path and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union
from ..errors import UserError

logger = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A config value is missing, mistyped or inconsistent; says where and what to do."""

    def __init__(self, file: str | Path | None, json_path: str, message: str):
        self.file = str(file) if file is not None else "<config>"
        self.json_path = json_path or "<root>"
        self.message = message
        super().__init__(f"{self.file}: {self.json_path}: {message}")


def strip_json_comments(text: str) -> str:
    """Remove `#` and `//` comments that stand outside JSON strings."""
    out = []
    in_string = False
    escaped = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            i += 1
            continue
        if ch == '"':
            in_string = True
            out.append(ch)
            i += 1
            continue
        if ch == "#" or (ch == "/" and i + 1 < n and text[i + 1] == "/"):
            while i < n and text[i] != "\n":
                i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def read_json(path: str | Path) -> dict:
    """Read a config file; syntax errors point at the line and column."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "file not found"
        raise ConfigError(path, "", f"{what}; pass an existing JSON config file")
    try:
        text = strip_json_comments(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start}); pass the JSON config file") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, "", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except RecursionError as e:
        raise ConfigError(path, "", "JSON nested too deeply to be a config") from e
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"top level must be a JSON object, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "object"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


# JSON scalars: annotation -> (accepts the value, what the error says was expected)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _convert(value: Any, tp: Any, file, path: str) -> Any:
    """Convert a JSON value to the annotated type or raise a ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, file, path)
    if origin is typing.Literal:
        return _convert_literal(value, tp, file, path)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, file, path)
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(file, path, f"expected an object, got {json.dumps(value)}")
        return from_dict(tp, value, file=file, path=path) if dataclasses.is_dataclass(tp) else dict(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(file, path, f"expected {expected}, got {json.dumps(value)}")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _convert_union(value: Any, tp: Any, file, path: str) -> Any:
    """The first member type that accepts `value`; Optional[X] reports X's own, more precise error."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    if len(candidates) == 1:
        return _convert(value, candidates[0], file, path)
    for arg in candidates:
        try:
            return _convert(value, arg, file, path)
        except ConfigError:
            continue
    raise ConfigError(file, path, f"expected {_type_name(tp)}, got {json.dumps(value)}")


def _convert_literal(value: Any, tp: Any, file, path: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(file, path, f"expected one of {list(allowed)}, got {value!r}{hint}")
    return value


def _convert_sequence(value: Any, tp: Any, file, path: str) -> tuple:
    """A JSON list as a tuple: fixed-length for tuple[X, Y], any length for list[X] / tuple[X, ...]."""
    if not isinstance(value, list):
        raise ConfigError(file, path, f"expected {_type_name(tp)}, got {json.dumps(value)}")
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(file, path, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, file, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    return tuple(_convert(v, item, file, f"{path}[{i}]") for i, v in enumerate(value))


# Keys of the reference's JSON configs that are accepted and type-checked but never read, with the reason (a
# misspelt key is still warned about as unknown); docs/configuration.md shows this table to users. A key is its
# JSON path from the top level of the model, data or inference file; `text_encoder` keys hold for
# `text_encoder_2` too, `dataset_param.tokenizer_config` keys for `tokenizer_config_2` and for the inference
# file's `tokenizer` / `tokenizer_2`.
IGNORED_CONFIG_KEYS = {
    "allow_tf32": "matmul precision stays at torch's default",
    "allow_internal_format": "Ascend switch for NPU private tensor formats; not used",
    "predictor.norm_elementwise_affine": "the released model's LayerNorms are always affine",
    "predictor.norm_cls": "LayerNorms are always computed in fp32 and cast back",
    "text_encoder.hub_backend": "only \"hf\": text encoders load with transformers from a local folder",
    "text_encoder.low_cpu_mem_usage": "transformers loads the weights lazily anyway",
    "dataset_param.dataset_type": "only \"t2v\"; image-to-video samples are selected by dataset_param.mask_config",
    "dataset_param.use_feature_data": "cached features are selected by the model file's load_video_features / "
                                      "load_text_features and dataset_param.feature_cache_dir",
    "dataset_param.basic_parameters.data_folder": "each line of the data_path file names its own media folder",
    "dataset_param.basic_parameters.data_storage_mode": "only \"combine\" (folder,annotation lines)",
    "dataset_param.preprocess_parameters.frame_interval": "must be 1: clips are resampled to train_fps and the "
                                                          "window is num_frames long",
    "dataset_param.preprocess_parameters.image_reader_type": "only \"Image\" (Pillow)",
    "dataset_param.preprocess_parameters.image_processer_type": "images go through train_pipeline.image (or the "
                                                                "default pipeline)",
    "dataset_param.preprocess_parameters.batch_size": "batch sizes come from --micro-batch-size and "
                                                      "--global-batch-size",
    "dataset_param.preprocess_parameters.gradient_accumulation_size": "accumulation is --global-batch-size / "
                                                                      "(--micro-batch-size x data-parallel size)",
    "dataset_param.preprocess_parameters.max_workers": "no per-sample watchdog thread; a failed read is retried "
                                                       "max_read_retries times",
    "dataset_param.preprocess_parameters.timeout": "no per-sample watchdog thread; a failed read is retried "
                                                   "max_read_retries times",
    "dataset_param.tokenizer_config.hub_backend": "only \"hf\": tokenizers load with transformers from a local folder",
    "dataset_param.tokenizer_config.autotokenizer_name": "only \"AutoTokenizer\"",
    "dataset_param.tokenizer_config.low_cpu_mem_usage": "tokenizers hold no weights",
    "dataloader_param.dataloader_mode": "only \"sampler\"",
    "dataloader_param.sampler_type": "only \"LengthGroupedSampler\"",
    "dataloader_param.batch_size": "batch sizes come from --micro-batch-size and --global-batch-size",
    "dataloader_param.shuffle": "the sampler always shuffles, seeded by (seed, epoch)",
    "dataloader_param.drop_last": "each shape's remainder short of a global batch is always left out of an epoch",
    "dataloader_param.group_data": "samples are always grouped by shape",
    "dataloader_param.initial_global_step_for_sampler": "a resume starts from the checkpoint's consumed samples",
    "dataloader_param.gradient_accumulation_size": "accumulation is --global-batch-size / "
                                                   "(--micro-batch-size x data-parallel size)",
    "dataloader_param.collate_param.model_name": "only \"GroupLength\"",
    "dataloader_param.collate_param.batch_size": "batch sizes come from --micro-batch-size and --global-batch-size",
    "dataloader_param.collate_param.group_data": "a micro-batch always holds one shape",
    "pipeline_config.model_type": "only \"t2v\"; image-to-video follows the predictor's model_id",
    "device": "the device is chosen automatically: the accelerator if there is one, else the CPU",
}


def from_dict(cls, data: dict, *, file=None, path: str = ""):
    """Build dataclass `cls` from `data`.

    Unknown keys warn with a did-you-mean; missing required keys and wrong types raise ConfigError. A dataclass
    may define `_aliases` (json name -> field name) and `validate(self, file, path)`. Keys that are accepted but
    never read are listed in `IGNORED_CONFIG_KEYS`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases: dict = getattr(cls, "_aliases", {})
    kwargs = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        sub = f"{path}.{key}" if path else key
        if name not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(aliases), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            logger.warning("%s: %s: unknown key, ignored%s", file or "<config>", sub, hint)
            continue
        kwargs[name] = _convert(value, hints[name], file, sub)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            sub = f"{path}.{name}" if path else name
            raise ConfigError(file, sub, f"required key is missing (expected {_type_name(hints[name])})")
    obj = cls(**kwargs)
    for name, spec in getattr(cls, "_ranges", {}).items():
        check_range(getattr(obj, name), spec, file, f"{path}.{name}" if path else name)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(file, path)
    return obj


def to_dict(obj) -> dict:
    """Dataclass to plain JSON-able dict (tuples become lists), for round trips and logs."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def in_range(value: float, spec: str) -> bool:
    """Whether `value` satisfies a range written as in the `_ranges` tables: ">= 1", "> 0", "[0, 1]", "[0, 1)"."""
    spec = spec.strip()
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        return above and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return {">=": value >= float(bound), ">": value > float(bound), "<=": value <= float(bound)}[op]


def check_range(value, spec: str, file, key: str) -> None:
    """Raise ConfigError naming `key` unless `value` (a number, or each number of a list; None passes) is in the
    range `spec` (see `in_range`). A dataclass declares its numeric keys' ranges in one `_ranges` table that
    `from_dict` checks before the dataclass's own cross-key `validate`."""
    values = value if isinstance(value, (list, tuple)) else (value,)
    for v in values:
        if v is not None and not in_range(v, spec):
            raise ConfigError(file, key, f"must be {'in ' if spec[0] in '[(' else ''}{spec}, got {value}")


def check_path(file, key: str, path: Optional[str], kind: str) -> None:
    """A path the config names exists and is a file (`kind="file"`), a folder (`"dir"`) or either (`"any"`);
    raise ConfigError naming the config file and key. None (not set) passes."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        what = {"file": "file", "dir": "folder"}.get(kind, "file or folder")
        raise ConfigError(file, key, f"{path}: does not exist; give an existing local {what}")
    if kind == "file" and not p.is_file():
        raise ConfigError(file, key, f"{path}: is a folder, expected a file")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(file, key, f"{path}: is a file, expected a folder")


def require(condition: bool, file, path: str, message: str) -> None:
    """Raise ConfigError(file, path, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(file, path, message)
