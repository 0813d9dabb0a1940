"""Frozen text encoders (T5 v1.1, CLIP-bigG), their tokenizers, and caption cleaning."""

from .encoder import TextEncoders, load_text_encoder
from .preprocess import apply_prompt_template, clean_caption
from .tokenizer import CLIP_MAX_LENGTH, T5_MAX_LENGTH, load_tokenizer, tokenize

__all__ = [
    "CLIP_MAX_LENGTH", "T5_MAX_LENGTH", "TextEncoders", "apply_prompt_template", "clean_caption",
    "load_text_encoder", "load_tokenizer", "tokenize",
]
