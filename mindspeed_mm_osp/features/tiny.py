"""A tiny end-to-end setup for the feature cache's tests and benchmark.

Tiny WF-VAE/T5/CLIP (`make_tiny_models`), examples/tiny's model JSON pointing at them, and a
synthetic dataset whose clips have exactly `num_frames` usable frames (so the online loader's
temporal window is unique and online and cached training see the same pixels), images of the
same size, one missing video (a read failure, retried on both paths) and one multi-caption image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLE_MODEL_JSON = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model.json"


@dataclass(frozen=True)
class TinySetup:
    data_json: Path
    model_json: Path
    cache_dir: Path


def make_tiny_setup(out_dir: str | Path, *, num_videos: int = 8, num_images: int = 8, cfg: float = 0.5,
                    height: int = 64, width: int = 128, num_frames: int = 17) -> TinySetup:
    from ..tools.make_synthetic_dataset import data_json_dict, write_image, write_video
    from ..tools.make_tiny_models import make_tiny_models

    out = Path(out_dir).resolve()
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    models = make_tiny_models(out / "models")
    records = []
    for j in range(num_videos):
        write_video(media / f"v{j:03d}.mp4", num_frames, height, width)
        records.append({"path": f"v{j:03d}.mp4", "cap": f"a red fox number {j} trots across a snowy meadow",
                        "resolution": {"height": height, "width": width}, "num_frames": num_frames, "fps": 24})
    records.append({"path": "missing.mp4", "cap": "a clip that is not on disk",
                    "resolution": {"height": height, "width": width}, "num_frames": num_frames, "fps": 24})
    for j in range(num_images):
        write_image(media / f"p{j:03d}.png", height, width, level=40 + 20 * j)
        cap = (["a small boat floats on a calm lake", "a dog runs on the beach at sunset"] if j == 0
               else f"a close up of cat {j} with blue eyes")
        records.append({"path": f"p{j:03d}.png", "cap": cap, "resolution": {"height": height, "width": width}})
    anno = media / "anno.json"
    anno.write_text(json.dumps(records))
    data_txt = out / "data.txt"
    data_txt.write_text(f"{media},{anno}\n")

    data = data_json_dict(data_txt, cfg=cfg, num_frames=num_frames, max_height=height, max_width=width,
                          min_hxw=height * width, max_hxw=height * width)
    pipeline = [{"trans_type": "ToTensorVideo"}, {"trans_type": "CenterCropResizeVideo",
                                                   "param": {"size": [height, width], "interpolation_mode": "bicubic"}},
                {"trans_type": "ae_norm"}]
    data["dataset_param"]["preprocess_parameters"]["train_pipeline"] = {"video": pipeline, "image": pipeline}
    data["dataset_param"]["tokenizer_config"] = {"from_pretrained": str(models["t5"])}
    data["dataset_param"]["tokenizer_config_2"] = {"from_pretrained": str(models["clip"])}
    cache_dir = out / "cache"
    data["dataset_param"]["feature_cache_dir"] = str(cache_dir)
    data_json = out / "data.json"
    data_json.write_text(json.dumps(data, indent=1))

    model = json.loads(EXAMPLE_MODEL_JSON.read_text())
    model["ae"]["from_pretrained"] = str(models["vae"])
    model["text_encoder"]["from_pretrained"] = str(models["t5"])
    model["text_encoder_2"]["from_pretrained"] = str(models["clip"])
    model_json = out / "model.json"
    model_json.write_text(json.dumps(model, indent=1))
    return TinySetup(data_json, model_json, cache_dir)


__all__ = ["TinySetup", "make_tiny_setup"]
