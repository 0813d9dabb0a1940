"""Merge TP-sharded training checkpoints (optionally the EMA weights) into one file, or split one back."""

from mindspeed_mm_osp.checkpoint.convert import main

if __name__ == "__main__":
    main()
