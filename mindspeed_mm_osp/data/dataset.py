"""Map-style text-to-video dataset over a filtered `SampleIndex`.

Items are addressed by `SampleKey(position, epoch, slot)` from the sampler: `slot` is the
sample's position in the epoch's global order. Every random choice of a read — temporal
window, caption choice, CFG drop, retry pick — comes from an RNG keyed on
(seed, epoch, slot, attempt), so a sample's tensors do not depend on worker count,
DP/TP rank or what was read before; TP peers (same DP rank) build identical batches with
no communication, and a resumed run reproduces the uninterrupted one.

Reading failures (missing / zero-byte / corrupt file, fewer frames than annotated,
decoded size not matching the bucket) are counted per reason and answered by reading
another sample of the same shape, at most `max_read_retries` times (the reference retries
without bound). Each failing file is logged once per process (the counts keep every failure); a file listed
in `broken_on_purpose.txt` next to data.txt (the synthetic demo set writes one) is logged as expected. Every item is a fresh dict (the reference returns one shared dict, so a batch
of several samples held copies of the last one).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from ..config.data import DatasetParam
from .index import KIND_IMAGE, SampleIndex
from .masks import MaskDrawer
from .readers import NoReadableSampleError, ReadError, VideoReader, read_image
from .transforms import Compose, build_pipeline, default_pipeline

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
BROKEN_ON_PURPOSE = "broken_on_purpose.txt"  # next to data.txt: files a test set breaks deliberately, one a line


def broken_on_purpose(data_path: str) -> frozenset[str]:
    """The resolved paths listed in `BROKEN_ON_PURPOSE` next to `data_path` (none without the file); `#` comments."""
    folder = Path(data_path).parent
    marker = folder / BROKEN_ON_PURPOSE
    if not marker.is_file():
        return frozenset()
    lines = (line.split("#", 1)[0].strip() for line in marker.read_text().splitlines())
    return frozenset(str((folder / line).resolve()) for line in lines if line)


class SampleKey(NamedTuple):
    position: int  # row of the SampleIndex
    epoch: int
    slot: int  # position in the epoch's global order (unique per epoch)


def _caption_cleaner() -> Callable[[str], str]:
    """`clean_caption` from the text package; fails clearly if that module is missing."""
    try:
        from ..models.text.preprocess import clean_caption
    except ImportError as e:
        raise ImportError("caption cleaning needs mindspeed_mm_osp.models.text.preprocess.clean_caption "
                          "(set enable_text_preprocess=false to train on raw captions)") from e
    return clean_caption


class CaptionProcessor:
    """Pick one caption, clean it (twice, as the reference does), drop it to "" with probability `cfg`,
    tokenize with both tokenizers. The CFG drop does not depend on cleaning (in the reference it
    happens only when cleaning is on). With a `template` (a prompt-template version, `caption_template` of the
    data JSON) the caption becomes the text the sampler would encode for it as a prompt instead."""

    def __init__(self, tokenizer, tokenizer_2, *, max_length: int, cfg: float, clean: bool,
                 template: Optional[str] = None):
        from ..models.text import sampler_texts
        from ..models.text.tokenizer import tokenize

        self._tokenize, self._sampler_texts = tokenize, sampler_texts
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_length, self.cfg, self.template = max_length, cfg, template
        self.clean = _caption_cleaner() if clean else None

    def choose(self, cap, rng: np.random.Generator) -> str:
        caps = [cap] if isinstance(cap, str) else list(cap)
        text = str(caps[int(rng.integers(len(caps)))])
        if self.template is not None:
            text = self._sampler_texts(text, None, self.template)[0]
        elif self.clean is not None:
            text = self.clean(self.clean(text))
        return "" if rng.random() < self.cfg else text

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        ids, mask = self._tokenize(text, self.tokenizer, self.max_length)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.tokenizer_2 is not None:
            ids2, mask2 = self._tokenize(text, self.tokenizer_2, CLIP_MAX_LENGTH)
            out.update(input_ids_2=ids2, attention_mask_2=mask2)
        return out


class T2VDataset(torch.utils.data.Dataset):
    """`dataset[SampleKey]` → dict(video [3,T,H,W] float, input_ids/attention_mask [1,L],
    input_ids_2/attention_mask_2 [1,77], read_failures {reason: n}), and with `mask_config` (image-to-video
    training) frame_mask [T] (1 = generate, 0 = given; `data.masks`)."""

    def __init__(self, index: SampleIndex, dataset_param: DatasetParam, *, tokenizer, tokenizer_2,
                 video_reader: VideoReader, seed: int):
        preprocess = dataset_param.preprocess_parameters
        if preprocess.use_aesthetic:
            raise ValueError("use_aesthetic=true (aesthetic caption notices) is not implemented; "
                             "Open-Sora Plan v1.5 video training sets it to false")
        self.index, self.preprocess, self.seed, self.reader = index, preprocess, seed, video_reader
        self.text = CaptionProcessor(tokenizer, tokenizer_2, max_length=dataset_param.model_max_length, cfg=preprocess.cfg,
                                     clean=dataset_param.enable_text_preprocess,
                                     template=dataset_param.caption_template)
        tp = preprocess.train_pipeline
        self.video_transform: Compose = build_pipeline(tp.video) if tp.video else default_pipeline(preprocess)
        self.image_transform: Compose = build_pipeline(tp.image) if tp.image else default_pipeline(preprocess)
        self.members = index.members()
        self.masks = MaskDrawer(dataset_param.mask_config) if dataset_param.mask_config is not None else None
        self._failures: Counter = Counter()
        self._reported: set[str] = set()
        self.expected_broken = broken_on_purpose(dataset_param.basic_parameters.data_path)

    def __len__(self) -> int:
        return len(self.index)

    def load_video(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        """Decode, crop and transform sample `i` → float [3, T, H, W]; raises ReadError."""
        idx = self.index
        shape = idx.shape(i)
        if idx.kind[i] == KIND_IMAGE:
            frames = read_image(idx.paths[i])
        else:
            frames = self.reader.read(idx.paths[i], idx.frame_indices(i, self.preprocess, rng))
        x0, x1, y0, y1 = idx.crop[i].tolist()
        if x0 >= 0:
            frames = frames[:, y0:y1, x0:x1]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        transform = self.image_transform if idx.kind[i] == KIND_IMAGE else self.video_transform
        x = transform(x)
        if tuple(x.shape[-2:]) != (shape.height, shape.width) or x.shape[0] != shape.frames:
            raise ReadError("shape_mismatch", idx.paths[i], f"got {tuple(x.shape)}, bucket {shape}")
        return x.permute(1, 0, 2, 3).contiguous()

    def _report(self, e: ReadError) -> None:
        """Log a file's first failure in this process; the retry reads another sample of the same shape."""
        if e.path in self._reported:
            return
        self._reported.add(e.path)
        if str(Path(e.path).resolve()) in self.expected_broken:
            logger.info("read failed (%s), reading another sample; expected: synthetic broken sample (listed in "
                        "%s)", e, BROKEN_ON_PURPOSE)
        else:
            logger.warning("read failed (%s), reading another sample of the same shape", e)

    def __getitem__(self, key: SampleKey) -> dict:
        position, epoch, slot = key
        group = self.members[int(self.index.shape_id[position])]
        tried = {int(position)}
        for attempt in range(self.preprocess.max_read_retries + 1):
            rng = np.random.default_rng((self.seed, epoch, slot, attempt))
            try:
                video = self.load_video(position, rng)
                break
            except ReadError as e:
                self._failures[e.reason] += 1
                self._report(e)
                untried = np.setdiff1d(group, np.fromiter(tried, np.int64), assume_unique=False)
                if len(untried) == 0 or attempt == self.preprocess.max_read_retries:
                    raise NoReadableSampleError(
                        f"no readable sample of shape {self.index.shape(position)} after {attempt + 1} attempts "
                        f"(read failures so far: {dict(self._failures)}; last: {e}); check the media files of "
                        "the annotations") from e
                position = int(untried[int(rng.integers(len(untried)))])
                tried.add(position)
        item = {"video": video, **self.text(self.text.choose(self.index.captions[position], rng))}
        if self.masks is not None:  # drawn last: the frames and caption draws are those of text-to-video training
            item["frame_mask"] = self.masks(video.shape[1], rng)[1]
        # Failures since the last item leave with it (worker processes cannot share counters).
        item["read_failures"], self._failures = dict(self._failures), Counter()
        return item


__all__ = ["BROKEN_ON_PURPOSE", "CaptionProcessor", "SampleKey", "T2VDataset", "broken_on_purpose"]
