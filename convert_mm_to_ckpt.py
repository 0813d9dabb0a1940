"""Merge TP-sharded training checkpoints (optionally the EMA weights) into one file, or split one back."""

from mindspeed_mm_osp.checkpoint.convert import cli

if __name__ == "__main__":
    cli()
