"""Pretraining: Megatron-style flags, model assembly, the loop, logging and FLOP counting."""
