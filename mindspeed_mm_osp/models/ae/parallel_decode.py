"""Exact multi-rank WF-VAE decode: contiguous spans of latent frames per rank, gathered on rank 0.

The chunked decoder is causal with a *finite* memory: through its caches, latent frame k's output depends on
latent frames [k - history, k + 1] only (the +1 is the look-ahead frame the chunked decoder already adds).
A rank that owns latent frames [start, end) therefore decodes [start - history, end + 1) with the ordinary
chunked decoder (same chunk size, same look-ahead rule) and keeps the output frames of [start, end): the
warm-up frames rebuild exactly the cache state the single-rank decode would have had, so the gathered video
equals the single-rank one up to floating-point reassociation (1e-10 in fp64, see tests).

`history` is measured, not hard-coded: one NaN-probe decode of a 1x1-pixel latent (NaN reaches every output
frame that depends on the poisoned frame, whatever the weights). For the release decoder topology it is 30
latent frames, so splitting only pays off for latents longer than that (240+ video frames): below it the
warm-up of the second span is the whole prefix, and the plan keeps the decode on one rank.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .wfvae import TEMPORAL_FACTOR, WFVAE

_HISTORY: "weakref.WeakKeyDictionary[WFVAE, int]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Span:
    """Latent frames [start, end) kept by one rank, decoded from `warm` (<= start) with `lookahead` extra frames."""

    warm: int
    start: int
    end: int
    lookahead: int

    @property
    def work(self) -> int:
        return self.end + self.lookahead - self.warm

    @property
    def empty(self) -> bool:
        return self.end <= self.start


def output_frames(start: int, end: int) -> tuple[int, int]:
    """[first, last) video frames of latent frames [start, end): latent 0 -> frame 0, latent k -> 8k-7 .. 8k."""
    first = 0 if start == 0 else TEMPORAL_FACTOR * start - (TEMPORAL_FACTOR - 1)
    last = 0 if end == 0 else TEMPORAL_FACTOR * (end - 1) + 1
    return first, last


@torch.no_grad()
def decoder_history(vae: WFVAE) -> int:
    """Latent frames of the past that reach an output frame (measured once per model by a NaN probe)."""
    if vae in _HISTORY:
        return _HISTORY[vae]
    param = next(vae.decoder.parameters())
    length = 16
    while True:
        z = torch.zeros(1, vae.latent_dim, length, 1, 1, dtype=param.dtype, device=param.device)
        poisoned = 1  # a regular frame (frame 0 is the image frame and reaches no further)
        z[:, :, poisoned] = float("nan")
        video = vae.decode(z)
        bad = torch.isnan(video).flatten(3).any(-1).any(1)[0].nonzero().flatten().tolist()
        last_latent = (bad[-1] + TEMPORAL_FACTOR - 1) // TEMPORAL_FACTOR
        first_latent = (bad[0] + TEMPORAL_FACTOR - 1) // TEMPORAL_FACTOR
        if first_latent < poisoned - 1:
            raise RuntimeError(f"WF-VAE decoder looks {poisoned - first_latent} latent frames ahead; the chunked "
                               "decode (and this parallel decode) assume one")
        if last_latent < length - 1:
            break
        length *= 2
    _HISTORY[vae] = last_latent - poisoned
    return _HISTORY[vae]


def plan_spans(length: int, ranks: int, history: int) -> list[Span]:
    """One span per rank minimising the largest per-rank work (decoded latent frames, warm-up included).

    Spans are contiguous and in rank order; trailing ranks get empty spans when splitting does not pay off.
    """
    if length < 1 or ranks < 1:
        raise ValueError(f"need >= 1 latent frame and >= 1 rank, got {length} frames, {ranks} ranks")

    def make(start: int, end: int) -> Span:
        return Span(max(0, start - history) if start < end else start, start, end, 1 if 0 < end < length else 0)

    def greedy(budget: int) -> Optional[list[Span]]:
        spans, start = [], 0
        for _ in range(ranks):
            end = start
            while end < length and make(start, end + 1).work <= budget:
                end += 1
            spans.append(make(start, end))
            start = end
        return spans if start == length else None

    lo, hi = 1, length + 1  # `hi` (everything on rank 0) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return greedy(lo)  # type: ignore[return-value]


def describe_plan(length: int, ranks: int, history: int) -> str:
    """What `decode_parallel` does with `length` latent frames over `ranks` ranks, in words for the run's log."""
    if ranks < 2:
        return f"not split: the replica has one rank, which decodes all {length} latent frames"
    spans = [s for s in plan_spans(length, ranks, history) if not s.empty]
    if len(spans) < 2:
        return (f"not split: {length} latent frames, and a second rank would first re-decode the {history} latent "
                f"frames before its span (the decoder's history), so one rank is fastest; splitting pays off for "
                f"latents longer than {history} frames")
    return (f"split {length} latent frames over {len(spans)} of {ranks} ranks: "
            + ", ".join(f"[{s.start}, {s.end})" for s in spans))


@torch.no_grad()
def decode_span(vae: WFVAE, z: torch.Tensor, span: Span, chunk_latent_frames: int) -> torch.Tensor:
    """Video frames of latent frames [span.start, span.end), equal to the same frames of `vae.decode(z)`."""
    video = vae.decode(z[:, :, span.warm:span.end + span.lookahead], chunk_latent_frames)
    first, last = output_frames(span.start - span.warm, span.end - span.warm)
    return video[:, :, first:last]


@torch.no_grad()
def decode_parallel(vae: WFVAE, z: torch.Tensor, chunk_latent_frames: int,
                    group: Optional[torch.distributed.ProcessGroup] = None) -> Optional[torch.Tensor]:
    """`vae.decode(z, chunk)` computed by every rank of `group` (all must call), returned on its rank 0 only.

    Ranks with a non-empty span send their frames to rank 0 point to point (shapes follow from the plan).
    """
    import torch.distributed as dist

    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    spans = plan_spans(z.shape[2], ranks, decoder_history(vae) if ranks > 1 else 0)
    mine = decode_span(vae, z, spans[rank], chunk_latent_frames) if not spans[rank].empty else None
    if rank != 0:
        if mine is not None:
            dist.send(mine.contiguous(), dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        return None
    parts = [mine]
    for r, span in enumerate(spans[1:], start=1):
        if span.empty:
            continue
        first, last = output_frames(span.start, span.end)
        buf = mine.new_empty(*mine.shape[:2], last - first, *mine.shape[3:])
        dist.recv(buf, dist.get_global_rank(group, r) if group is not None else r, group=group)
        parts.append(buf)
    return torch.cat(parts, dim=2)


__all__ = ["Span", "decode_parallel", "decode_span", "decoder_history", "describe_plan", "output_frames", "plan_spans"]
