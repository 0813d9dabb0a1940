"""Same as the top-level convert_mm_to_ckpt.py, at the path the reference README uses."""

from mindspeed_mm_osp.checkpoint.convert import main

if __name__ == "__main__":
    main()
