"""mindspeed-mm-osp: Open-Sora Plan v1.5 training and inference on megatron-core."""
