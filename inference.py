"""Open-Sora Plan v1.5 text-to-video sampling. Launch with torchrun for TP>1; see examples/opensoraplan1.5/inference_t2v_1_5.sh."""

from mindspeed_mm_osp.inference.cli import main

if __name__ == "__main__":
    main()
