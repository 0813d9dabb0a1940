"""Tiny models and an end-to-end tiny setup, built in code so they work from an installed wheel.

`TINY_PREDICTOR` (3 stages) and `TINY_PREDICTOR_7_STAGES` (the release's 1-2-4-8-4-2-1 sparsity schedule at
width 64) are the predictor configs the tests and benchmarks share; `tiny_model_config` is the model JSON of
`examples/tiny/model.json` (a test keeps the two equal); `make_tiny_setup` adds a synthetic dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Small enough for converter and checkpoint-loader tests (a few hundred kB).
TINY_PREDICTOR = dict(num_layers=[1, 1, 1], sparse_n=[1, 2, 1], num_heads=4, head_dim=16, in_channels=4,
                      timestep_embed_dim=32, caption_channels=24, pooled_projection_dim=16)
TINY_PREDICTOR_7_STAGES = dict(TINY_PREDICTOR, num_layers=[2] * 7, sparse_n=[1, 2, 4, 8, 4, 2, 1])


def tiny_predictor_config(base: dict = TINY_PREDICTOR, **overrides):
    """`PredictorConfig` of `base` (default `TINY_PREDICTOR`) with `overrides` applied."""
    from ..config import from_dict
    from ..config.predictor import PredictorConfig

    return from_dict(PredictorConfig, {**base, **overrides})


def tiny_predictor_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Merged (TP=1) weights of a freshly initialised `TINY_PREDICTOR` (seeds the global RNG)."""
    from ..models.predictor import SparseUMMDiT, local_state_dict

    torch.manual_seed(seed)
    return local_state_dict(SparseUMMDiT(tiny_predictor_config()))


_WAVELET_LEVEL = {"dowmsample_block": "Spatial2xTime2x3DDownsample", "downsample_wavelet": "HaarWaveletTransform3D",
                  "upsample_block": "Spatial2xTime2x3DUpsample", "upsample_wavelet": "InverseHaarWaveletTransform3D"}


def tiny_model_config(models: dict[str, Path | str]) -> dict:
    """The tiny text-to-video model JSON (`examples/tiny/model.json`) with its weights at `models`
    (`make_tiny_models`' result: paths of "vae", "t5" and "clip")."""
    ae = dict(model_id="wfvae", base_channels=8, latent_dim=4, encoder_num_resblocks=2, decoder_num_resblocks=2,
              encoder_energy_flow_hidden_size=4, decoder_energy_flow_hidden_size=12, connect_res_layer_num=1,
              **{f"{level}_{k}": v for level in ("l1", "l2") for k, v in _WAVELET_LEVEL.items()},
              use_attention=True, norm_type="layernorm", t_interpolation="trilinear", dropout=0.0,
              scale=[0.7031, 0.7109, 1.5391, 1.2969], shift=[-0.2129, 0.1226, 1.6328, 0.6211], use_tiling=True,
              tile_latent_frames=1, encode_tile_latent_frames=1, vae_scale_factor=[8, 8, 8],
              from_pretrained=str(models["vae"]), dtype="fp32")
    predictor = dict(TINY_PREDICTOR_7_STAGES, model_id="SparseUMMDiT", double_ff=True, sparse1d=True,
                     out_channels=4, caption_channels=32, skip_connection=True, skip_connection_zero_init=True,
                     dropout=0.0, attention_bias=True, patch_size=2, patch_size_t=1,
                     activation_fn="gelu-approximate", norm_eps=1e-6, from_pretrained=None)
    text = dict(hub_backend="hf", low_cpu_mem_usage=False)
    return {"frames": 9, "load_video_features": False, "load_text_features": False, "enable_encoder_dp": False,
            "weight_dtype": "fp32", "ae": ae,
            "text_encoder": dict(text, model_id="T5", from_pretrained=str(models["t5"])),
            "text_encoder_2": dict(text, model_id="CLIPWithProjection", from_pretrained=str(models["clip"])),
            "predictor": predictor,
            "diffusion": {"model_id": "OpenSoraPlan", "weighting_scheme": "logit_normal",
                          "use_dynamic_shifting": True}}


@dataclass(frozen=True)
class TinySetup:
    data_json: Path
    model_json: Path
    cache_dir: Path


def _write_media(media: Path, num_videos: int, num_images: int, height: int, width: int, num_frames: int) -> Path:
    """Clips with exactly `num_frames` usable frames (the online loader's temporal window is then unique, so
    online and cached training see the same pixels), one missing video (a read failure, retried on both paths),
    images of the same size, one of them with two captions. Returns the annotation file."""
    from ..tools.make_synthetic_dataset import write_image, write_video

    media.mkdir(parents=True, exist_ok=True)
    size = {"height": height, "width": width}
    records = []
    for j in range(num_videos):
        write_video(media / f"v{j:03d}.mp4", num_frames, height, width)
        records.append({"path": f"v{j:03d}.mp4", "cap": f"a red fox number {j} trots across a snowy meadow",
                        "resolution": size, "num_frames": num_frames, "fps": 24})
    records.append({"path": "missing.mp4", "cap": "a clip that is not on disk", "resolution": size,
                    "num_frames": num_frames, "fps": 24})
    for j in range(num_images):
        write_image(media / f"p{j:03d}.png", height, width, level=40 + 20 * j)
        cap = (["a small boat floats on a calm lake", "a dog runs on the beach at sunset"] if j == 0
               else f"a close up of cat {j} with blue eyes")
        records.append({"path": f"p{j:03d}.png", "cap": cap, "resolution": size})
    anno = media / "anno.json"
    anno.write_text(json.dumps(records))
    return anno


def make_tiny_setup(out_dir: str | Path, *, num_videos: int = 8, num_images: int = 8, cfg: float = 0.5,
                    height: int = 64, width: int = 128, num_frames: int = 17) -> TinySetup:
    """Tiny WF-VAE/T5/CLIP (`make_tiny_models`), the tiny model JSON pointing at them and a synthetic dataset
    (see `_write_media`) with a feature-cache folder: what the feature cache's tests and benchmark run on."""
    from ..tools.make_synthetic_dataset import data_json_dict
    from ..tools.make_tiny_models import make_tiny_models

    out = Path(out_dir).resolve()
    models = make_tiny_models(out / "models")
    anno = _write_media(out / "media", num_videos, num_images, height, width, num_frames)
    data_txt = out / "data.txt"
    data_txt.write_text(f"{anno.parent},{anno}\n")

    data = data_json_dict(data_txt, cfg=cfg, num_frames=num_frames, max_height=height, max_width=width,
                          min_hxw=height * width, max_hxw=height * width)
    pipeline = [{"trans_type": "ToTensorVideo"}, {"trans_type": "CenterCropResizeVideo",
                                                   "param": {"size": [height, width], "interpolation_mode": "bicubic"}},
                {"trans_type": "ae_norm"}]
    dataset_param = data["dataset_param"]
    dataset_param["preprocess_parameters"]["train_pipeline"] = {"video": pipeline, "image": pipeline}
    dataset_param["tokenizer_config"] = {"from_pretrained": str(models["t5"])}
    dataset_param["tokenizer_config_2"] = {"from_pretrained": str(models["clip"])}
    cache_dir = out / "cache"
    dataset_param["feature_cache_dir"] = str(cache_dir)
    data_json = out / "data.json"
    data_json.write_text(json.dumps(data, indent=1))
    model_json = out / "model.json"
    model_json.write_text(json.dumps(tiny_model_config(models), indent=1))
    return TinySetup(data_json, model_json, cache_dir)


__all__ = ["TINY_PREDICTOR", "TINY_PREDICTOR_7_STAGES", "TinySetup", "make_tiny_setup", "tiny_model_config",
           "tiny_predictor_config", "tiny_predictor_weights"]
