"""Open-Sora Plan v1.5 pretraining. Launch with torchrun; see examples/opensoraplan1.5/pretrain_opensoraplan1_5.sh."""

from mindspeed_mm_osp.training.cli import main

if __name__ == "__main__":
    main()
