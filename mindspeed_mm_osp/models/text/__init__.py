"""Frozen text encoders (T5 v1.1, CLIP-bigG), their tokenizers, and caption cleaning."""

from .encoder import TextEncoders, load_text_encoder
from .preprocess import PROMPT_VERSION, apply_prompt_template, clean_caption, sampler_texts
from .tokenizer import CLIP_MAX_LENGTH, T5_MAX_LENGTH, load_tokenizer, tokenize

__all__ = [
    "CLIP_MAX_LENGTH", "PROMPT_VERSION", "T5_MAX_LENGTH", "TextEncoders", "apply_prompt_template", "clean_caption",
    "load_text_encoder", "load_tokenizer", "sampler_texts", "tokenize",
]
