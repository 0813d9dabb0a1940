"""Tiny random-weight T5 / CLIP folders that load exactly like the real checkpoints.

Tests, the CPU demo and end-to-end runs cannot download the real T5-XL / CLIP-bigG, so
these writers build small models from configs and tokenizers in-process from a fixed
corpus (SentencePiece training for T5, a byte-level BPE for CLIP), then `save_pretrained` both into one folder. `T5EncoderModel.from_pretrained`,
`CLIPTextModelWithProjection.from_pretrained` and `AutoTokenizer.from_pretrained` then
load them through the same code path as real weights. Everything is seeded: the same
arguments give the same bytes-for-bytes tensors and vocabularies.

transformers 5 traps avoided here: `T5Tokenizer(vocab_file=...)` and
`CLIPTokenizer(vocab_file=..., merges_file=...)` are silently ignored (specials-only
vocabularies), so the tokenizers are built from in-memory vocabularies instead.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# A small fixed corpus in the style of video captions; covers the test prompts' words.
CORPUS = (
    "a red fox trots across a snowy meadow at sunrise",
    "a stylish woman walks down a tokyo street filled with warm glowing neon",
    "several giant wooly mammoths approach treading through a snowy meadow",
    "a drone view of waves crashing against rugged cliffs along the coast",
    "a close up of a cat with blue eyes sitting on a wooden table",
    "the camera rotates around a stack of vintage televisions",
    "high quality, a dog runs on the beach at sunset, cinematic lighting.",
    "worst quality, low quality, blurry, artifacts, watermark, cropped, ugly.",
    "a small boat floats on a calm lake under a cloudy sky",
    "children play in the park while birds fly over green trees",
    "the city at night with bright lights and busy streets",
    "an old man reads a book in a quiet library",
    "slow motion video of rain drops falling on a window",
    "a bird and a cat and a dog in a garden with red and yellow flowers",
)

T5_EXTRA_IDS = 8
CLIP_MAX_POSITIONS = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _train_t5_tokenizer(vocab_size: int, seed: int) -> T5Tokenizer:
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=512)


def _build_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE laid out like CLIP's: single characters, the same with the
    end-of-word mark, one merge chain per corpus word (so corpus words are single tokens and
    anything else falls back to characters), then BOS/EOS last (EOS doubles as padding).

    Built directly rather than with `tokenizers`' BpeTrainer, whose vocabulary order
    varies from run to run (Rust hash maps), which would break reproducible folders.
    """
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII: bytes_to_unicode maps them to themselves
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    words = sorted({w for line in CORPUS for w in re.findall(r"[a-z]+", line)})
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merged = prefix + piece
            if merged not in vocab:
                merges.append((prefix, piece))
                vocab[merged] = len(vocab)
            prefix = merged
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_POSITIONS)


def _save_seeded(model_cls, config, tokenizer, out_dir: Path, seed: int) -> Path:
    """Random-init `model_cls(config)` from `seed` (global RNG untouched), saved with its tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tiny_t5(out_dir: str | Path, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                  d_ff: int = 64, vocab_size: int = 64, seed: int = 0) -> Path:
    """A T5 v1.1-style (gated-GELU) encoder + SentencePiece tokenizer in `out_dir`.

    Returns the folder; `d_model` is the DiT's `caption_channels`.
    """
    out_dir = Path(out_dir)
    tokenizer = _train_t5_tokenizer(vocab_size, seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    return _save_seeded(T5EncoderModel, config, tokenizer, out_dir, seed)


def write_tiny_clip(out_dir: str | Path, hidden: int = 32, projection_dim: int = 24, num_layers: int = 2,
                    num_heads: int = 4, intermediate: int = 64, seed: int = 0) -> Path:
    """A CLIP text tower with projection + BPE tokenizer (77 positions) in `out_dir`.

    Returns the folder; `projection_dim` is the DiT's `pooled_projection_dim`.
    """
    out_dir = Path(out_dir)
    tokenizer = _build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=CLIP_MAX_POSITIONS,
        projection_dim=projection_dim, hidden_act="gelu", attention_dropout=0.0,
        # The pooled token is located by this id, so it must be the tokenizer's EOS.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return _save_seeded(CLIPTextModelWithProjection, config, tokenizer, out_dir, seed)
