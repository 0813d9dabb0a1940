"""The data JSON (`--mm-data`): dataset, preprocessing and dataloader settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .loader import check_path, from_dict, read_json, require
from .text import TokenizerConfig


@dataclass(frozen=True)
class TransformSpec:
    """One step of a train pipeline; `data.transforms.build_pipeline` turns these into callables.

    Only the transforms Open-Sora Plan v1.5 uses are accepted (the reference's unused ones
    are broken there: docs/reference_bugs.md, `unused-transforms-broken`).
    """

    trans_type: Literal["ToTensorVideo", "CenterCropResizeVideo", "ae_norm",
                        "MaxHWStrideResizeVideo", "SpatialStrideCropVideo"]
    param: dict = field(default_factory=dict)

    def validate(self, file, path: str) -> None:
        """Each `param` key is one the transform takes, of the type and range it needs (`TRANSFORM_PARAMS`)."""
        allowed = TRANSFORM_PARAMS[self.trans_type]
        for key, value in self.param.items():
            require(key in allowed, file, f"{path}.param.{key}",
                    f"{self.trans_type} takes {sorted(allowed) or 'no parameters'}")
            require(allowed[key][0](value), file, f"{path}.param.{key}", f"must be {allowed[key][1]}, got {value!r}")


def _side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536


_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
_PARAM_TYPES = {
    "size": (lambda v: isinstance(v, list) and len(v) == 2 and all(_side(x) for x in v), "[height, width] in [1, 65536]"),
    "top_crop": (lambda v: isinstance(v, bool), "true or false"),
    "force_5_ratio": (lambda v: isinstance(v, bool), "true or false"),
    "interpolation_mode": (lambda v: v in _MODES, f"one of {list(_MODES)}"),
    "max_hxw": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 32, "an integer >= 1"),
    "hw_stride": (_side, "an integer in [1, 65536]"),
    "stride": (_side, "an integer in [1, 65536]"),
}
# The parameters each transform takes (the constructor's keywords in `data.transforms`), with their types.
TRANSFORM_PARAMS = {name: {k: _PARAM_TYPES[k] for k in keys} for name, keys in {
    "ToTensorVideo": (), "ae_norm": (), "CenterCropResizeVideo": ("size", "top_crop", "interpolation_mode"),
    "MaxHWStrideResizeVideo": ("max_hxw", "force_5_ratio", "hw_stride", "interpolation_mode"),
    "SpatialStrideCropVideo": ("stride", "force_5_ratio")}.items()}


@dataclass(frozen=True)
class TrainPipeline:
    video: tuple[TransformSpec, ...] = ()
    image: tuple[TransformSpec, ...] = ()


@dataclass(frozen=True)
class BasicParameters:
    data_path: str
    data_folder: str = ""
    data_storage_mode: Literal["combine"] = "combine"
    # An annotation `path` that is absolute or leaves its data folder with `..` is dropped at index time
    # (counted as `path_outside_data_folder`) unless this is true (docs/data.md).
    allow_paths_outside_data_folder: bool = False


@dataclass(frozen=True)
class PreprocessParameters:
    video_reader_type: Literal["decoder", "pyav", "decord"] = "decoder"
    image_reader_type: Literal["Image"] = "Image"
    num_frames: int = 16
    frame_interval: int = 1
    max_height: int = 480
    max_width: int = 640
    max_hxw: Optional[int] = None
    min_hxw: Optional[int] = None
    force_resolution: bool = True
    force_5_ratio: bool = False
    max_h_div_w_ratio: float = 2.0
    min_h_div_w_ratio: float = 0.5
    hw_stride: int = 16
    ae_stride_t: int = 8
    train_fps: int = 24
    speed_factor: float = 1.0
    too_long_factor: float = 5.0
    drop_short_ratio: float = 1.0
    min_num_frames: int = 29
    cfg: float = 0.1
    # Not read (loader.IGNORED_CONFIG_KEYS): the real accumulation comes from the launcher's batch sizes.
    batch_size: int = 1
    gradient_accumulation_size: int = 1
    use_aesthetic: bool = False
    sp_size: int = 1
    seed: int = 42
    max_workers: int = 1
    timeout: float = 600.0
    image_processer_type: str = "image2image"
    # How many other samples of the same shape are tried when a file cannot be read.
    max_read_retries: int = 10
    # The minority filter: a sample shape with fewer than this x global_batch_size samples is dropped (0 keeps all).
    min_samples_per_shape_factor: int = 4
    train_pipeline: TrainPipeline = field(default_factory=TrainPipeline)

    # Ranges of the numeric keys (checked by `loader.from_dict`); cross-key rules are in `validate`.
    _ranges = {"num_frames": "[1, 100000]", "max_height": "[1, 65536]", "max_width": "[1, 65536]",
               "max_hxw": "[1, 4294967296]", "min_hxw": "[1, 4294967296]", "max_h_div_w_ratio": "(0, 1000]",
               "min_h_div_w_ratio": "(0, 1000]", "hw_stride": "[1, 65536]", "train_fps": "[1, 1000]",
               "too_long_factor": "(0, 1000000]", "drop_short_ratio": "[0, 1]", "min_num_frames": "[1, 100000]",
               "sp_size": "[1, 1024]", "seed": "[0, 4294967295]", "timeout": "> 0", "max_read_retries": "[0, 1000]",
               "speed_factor": "(0, 1000]", "min_samples_per_shape_factor": "[0, 1000000]"}

    def validate(self, file, path: str) -> None:
        require(self.ae_stride_t >= 1, file, f"{path}.ae_stride_t", "must be >= 1")
        require(math.isfinite(self.speed_factor) and self.speed_factor > 0, file, f"{path}.speed_factor", "must be > 0")
        require(self.frame_interval == 1, file, f"{path}.frame_interval",
                "must be 1 (values > 1 only enlarge the crop window beyond num_frames in Open-Sora Plan)")
        require(self.num_frames >= 1 and (self.num_frames - 1) % self.ae_stride_t == 0, file, f"{path}.num_frames",
                f"must be {self.ae_stride_t}k+1 for ae_stride_t={self.ae_stride_t}, got {self.num_frames}")
        require(self.max_hxw is not None or self.min_hxw is not None, file, f"{path}.max_hxw",
                "set max_hxw and/or min_hxw (pixel-area bounds used for resolution filtering)")
        require(self.force_resolution or self.max_hxw is not None, file, f"{path}.max_hxw",
                "multi-resolution mode (force_resolution false) needs max_hxw")
        require(self.sp_size >= 1 and ((self.num_frames - 1) // self.ae_stride_t + 1) % self.sp_size == 0, file,
                f"{path}.num_frames", f"latent length of num_frames={self.num_frames} must be a multiple of "
                f"sp_size={self.sp_size}")
        require(self.num_frames >= self.min_num_frames, file, f"{path}.min_num_frames",
                f"must be <= num_frames={self.num_frames}")
        if self.force_resolution:
            for key in ("max_height", "max_width"):
                v = getattr(self, key)
                require(v >= 16 and v % 16 == 0, file, f"{path}.{key}",
                        f"must be a multiple of 16 (VAE stride 8 x patch 2) with force_resolution, got {v}")
        else:
            require(self.hw_stride % 16 == 0, file, f"{path}.hw_stride", f"must be a multiple of 16, got {self.hw_stride}")
        require(0.0 <= self.cfg <= 1.0, file, f"{path}.cfg", f"caption-drop probability must be in [0, 1], got {self.cfg}")
        require(self.min_h_div_w_ratio <= self.max_h_div_w_ratio, file, f"{path}.min_h_div_w_ratio",
                "must be <= max_h_div_w_ratio")
        require(self.train_fps > 0, file, f"{path}.train_fps", "must be > 0")
        require(self.max_read_retries >= 0, file, f"{path}.max_read_retries", "must be >= 0")


MASK_TYPES = ("t2iv", "i2v", "transition", "continuation", "clear", "random_temporal")
IMAGE_MASK_TYPES = ("t2iv", "clear")


@dataclass(frozen=True)
class MaskConfig:
    """Per-sample conditioning masks for image-to-video training (names, keys and defaults of Open-Sora Plan 1.3's
    mask config). A sample's mask type is drawn with these relative weights; video clips use the video table,
    single images the image one (only t2iv and clear apply to one frame). Continuation keeps the first k frames and
    random_temporal k random ones, k uniform in [floor(T*min_clear_ratio), ceil(T*max_clear_ratio)]."""

    mask_type_ratio_dict_video: dict = field(default_factory=lambda: {
        "t2iv": 1.0, "i2v": 8.0, "transition": 8.0, "continuation": 2.0, "clear": 0.0, "random_temporal": 1.0})
    mask_type_ratio_dict_image: dict = field(default_factory=lambda: {"t2iv": 1.0})
    min_clear_ratio: float = 0.0
    max_clear_ratio: float = 1.0

    def validate(self, file, path: str) -> None:
        for key, names in (("mask_type_ratio_dict_video", MASK_TYPES), ("mask_type_ratio_dict_image", IMAGE_MASK_TYPES)):
            table = getattr(self, key)
            for name, weight in table.items():
                require(name in names, file, f"{path}.{key}.{name}", f"unknown mask type; use one of {list(names)}")
                require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                        and weight >= 0, file, f"{path}.{key}.{name}", f"weight must be a number >= 0, got {weight!r}")
            require(sum(table.values()) > 0, file, f"{path}.{key}", "needs at least one weight > 0")
        require(0.0 <= self.min_clear_ratio <= self.max_clear_ratio <= 1.0, file, f"{path}.min_clear_ratio",
                f"need 0 <= min_clear_ratio <= max_clear_ratio <= 1, got {self.min_clear_ratio}, {self.max_clear_ratio}")


@dataclass(frozen=True)
class DatasetParam:
    basic_parameters: BasicParameters
    preprocess_parameters: PreprocessParameters
    tokenizer_config: Optional[TokenizerConfig] = None
    tokenizer_config_2: Optional[TokenizerConfig] = None
    dataset_type: Literal["t2v"] = "t2v"
    use_text_processer: bool = True
    enable_text_preprocess: bool = True
    model_max_length: int = 512
    use_feature_data: bool = False
    # Folder written by `python -m mindspeed_mm_osp.tools.extract_features`; read when the model JSON
    # sets load_video_features / load_text_features (see mindspeed_mm_osp.features).
    feature_cache_dir: Optional[str] = None
    # Every kept video also contributes one random frame of itself as an image sample
    # (the reference accepts the key but ignores it).
    use_img_from_vid: bool = False
    # Image-to-video training (a `SparseUMMDiTInpaint` predictor): every sample also carries a frame mask.
    mask_config: Optional[MaskConfig] = None
    # A prompt-template version ("v1.5"): every training caption becomes the text the sampler encodes for it as a
    # prompt (the template, then cleaning), as distillation needs (docs/distillation.md); none: the caption as is.
    caption_template: Optional[Literal["v1.5"]] = None

    # The reference's data.json says `enable_text_preprocess`, its constructor reads
    # `enable_text_preprocessing` (docs/reference_bugs.md, `text-preprocess-key-spelling`): accept both spellings.
    _aliases = {"enable_text_preprocessing": "enable_text_preprocess"}

    def validate(self, file, path: str) -> None:
        require(self.model_max_length >= 1, file, f"{path}.model_max_length", "must be >= 1")
        require(self.use_text_processer, file, f"{path}.use_text_processer",
                "must be true: every sample is tokenized (the reference retries forever without it)")


@dataclass(frozen=True)
class CollateParam:
    model_name: Literal["GroupLength"] = "GroupLength"
    batch_size: int = 1
    num_frames: int = 16
    group_data: bool = True
    ae_stride: int = 8
    ae_stride_t: int = 8
    patch_size: int = 2
    patch_size_t: int = 1

    _ranges = {"num_frames": "[1, 100000]", "ae_stride_t": "[1, 64]", "ae_stride": "[1, 64]", "patch_size": "[1, 64]",
               "patch_size_t": "[1, 64]"}

    def validate(self, file, path: str) -> None:
        for key in ("ae_stride", "patch_size", "patch_size_t"):
            require(getattr(self, key) >= 1, file, f"{path}.{key}", "must be >= 1")


@dataclass(frozen=True)
class DataloaderParam:
    dataloader_mode: Literal["sampler"] = "sampler"
    sampler_type: Literal["LengthGroupedSampler"] = "LengthGroupedSampler"
    batch_size: int = 1
    num_workers: int = 0
    shuffle: bool = False
    drop_last: bool = True
    pin_memory: bool = False
    group_data: bool = True
    # Not read (loader.IGNORED_CONFIG_KEYS): the sampler resumes from the trainer's consumed_samples and derives
    # gradient accumulation from the trainer's batch sizes (docs/reference_bugs.md, `resume-uses-stale-accumulation`).
    initial_global_step_for_sampler: int = 0
    gradient_accumulation_size: int = 1
    collate_param: CollateParam = field(default_factory=CollateParam)

    _ranges = {"num_workers": "[0, 256]"}

    def validate(self, file, path: str) -> None:
        require(self.num_workers >= 0, file, f"{path}.num_workers", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = field(default_factory=DataloaderParam)

    def validate(self, file, path: str) -> None:
        preprocess = self.dataset_param.preprocess_parameters
        cp = self.dataloader_param.collate_param
        require(cp.num_frames == preprocess.num_frames, file, "dataloader_param.collate_param.num_frames",
                f"must equal dataset_param.preprocess_parameters.num_frames={preprocess.num_frames}, "
                f"got {cp.num_frames}")
        require(cp.ae_stride_t == preprocess.ae_stride_t, file, "dataloader_param.collate_param.ae_stride_t",
                f"must equal dataset_param.preprocess_parameters.ae_stride_t={preprocess.ae_stride_t}")

    def check_paths(self, file, *, tokenizers: bool = True, feature_cache: bool = False) -> None:
        """The files this config names exist and are of the right kind (ConfigError naming the key): data_path,
        every annotation file it lists, the tokenizer folders (`tokenizers`) and the feature cache folder
        (`feature_cache`). Called by the entry points before anything is built, not when the JSON is loaded."""
        from ..data.annotations import parse_data_txt

        dp = self.dataset_param
        key = "dataset_param.basic_parameters.data_path"
        check_path(file, key, dp.basic_parameters.data_path, "file")
        for lineno, (folder, anno) in enumerate(parse_data_txt(dp.basic_parameters.data_path), 1):
            check_path(file, f"{key} ({dp.basic_parameters.data_path}, entry {lineno})", anno, "file")
            check_path(file, f"{key} ({dp.basic_parameters.data_path}, entry {lineno})", folder or ".", "dir")
        for name in ("tokenizer_config", "tokenizer_config_2"):
            tok = getattr(dp, name)
            if tokenizers and tok is not None:
                check_path(file, f"dataset_param.{name}.from_pretrained", tok.from_pretrained, "dir")
        if feature_cache:
            require(dp.feature_cache_dir is not None, file, "dataset_param.feature_cache_dir",
                    "the model JSON reads cached features (load_video_features/load_text_features): set it to the "
                    "folder written by tools.extract_features")
            check_path(file, "dataset_param.feature_cache_dir", dp.feature_cache_dir, "dir")


def load_data_config(path: str | Path) -> DataConfig:
    return from_dict(DataConfig, read_json(path), file=str(path))


