"""Clips for WF-VAE training: the predictor's data pipeline without captions, and per-sample posterior noise.

The loader is the same index, filter, readers, transforms, shape-grouped sampler and collate as predictor
training (docs/data.md); only the captions are not tokenized (no tokenizer is needed). It cycles over the data
for as many epochs as `--train-iters` needs. The posterior noise of a sample is keyed by the run's seed and the
sample's position in the global sample stream, so it is the same whatever the DP size, micro-batch size or
resume point.
"""

from __future__ import annotations

import torch

from ..config.data import DataConfig
from ..data import GroupLengthCollate, T2VDataset, assemble_loader, build_index_from_config, make_video_reader
from ..parallel import ParallelDims
from .step import keyed_generator


class _NoCaption:
    """Stands in for the caption processor: the autoencoder trains on pixels only."""

    def choose(self, cap, rng) -> str:
        return ""

    def __call__(self, text: str) -> dict:
        return {}


def build_clip_loader(data_cfg: DataConfig, dims: ParallelDims, *, micro_batch_size: int, global_batch_size: int,
                      consumed_samples: int, seed: int, train_iters: int):
    """(loader of this DP rank's `PixelBatch`es, DatasetStats), positioned after `consumed_samples`."""
    index, filter_stats = build_index_from_config(data_cfg, global_batch_size=global_batch_size)
    dp = data_cfg.dataset_param
    dataset = T2VDataset(index, dp, tokenizer=None, tokenizer_2=None,
                         video_reader=make_video_reader(dp.preprocess_parameters.video_reader_type), seed=seed)
    dataset.text = _NoCaption()
    return assemble_loader(data_cfg, index, filter_stats, dataset,
                           GroupLengthCollate(data_cfg.dataloader_param.collate_param), dp_rank=dims.dp_rank,
                           dp_size=dims.dp, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                           consumed_samples=consumed_samples, seed=seed, num_epochs=max(1, train_iters))


def posterior_noise(latent_shape: tuple[int, ...], *, seed: int, first_sample: int) -> torch.Tensor:
    """Standard normal noise (B, Z, t, h, w); sample i's from the generator keyed by `first_sample + i`."""
    return torch.stack([torch.randn(latent_shape[1:], generator=keyed_generator(seed, "vae-posterior",
                                                                                first_sample + i))
                        for i in range(latent_shape[0])])





def to_uint8_range(video: torch.Tensor) -> torch.Tensor:
    """One clip (3, T, H, W) in [-1, 1] -> (T, H, W, 3) in [0, 255] (clamped, not rounded), as `metrics` takes."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0)


@torch.no_grad()
def reconstruction_psnr(model, videos: list[torch.Tensor]) -> float:
    """Mean PSNR (dB, `metrics.psnr`) of the WF-VAE's reconstructions (posterior mean) of clips (B, 3, T, H, W)."""
    from ..metrics import psnr
    from ..models.ae.wfvae import split_posterior

    scores = []
    device = next(model.parameters()).device
    for video in videos:
        recon = model.decode(split_posterior(model.encode(video.to(device)))[0]).cpu()
        scores += [psnr(to_uint8_range(a), to_uint8_range(b)) for a, b in zip(video, recon)]
    return sum(scores) / len(scores)

__all__ = ["build_clip_loader", "posterior_noise", "reconstruction_psnr", "to_uint8_range"]
