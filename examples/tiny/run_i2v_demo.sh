#!/usr/bin/env bash
# Image-to-video demo on CPU, from the T2V weights trained by run_demo.sh (run it first; ~3 minutes on 2 cores):
#   1. I2V training (inpaint predictor initialised from the T2V EMA weights, per-sample mask types) with TP=2 + SP
#      on 2 CPU processes
#   2. merge the TP shards (EMA)
#   3. generate from a first frame (--image) and continue a clip (--video --condition-frames 9); the PSNR of the
#      given frames (output vs input, and the VAE's own round trip) is printed
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
ITERS=${ITERS:-20}
need_base_demo "T2V weights"
rm -rf "$OUT/i2v_ckpt" "$OUT/i2v_merged" "$OUT/i2v_samples"

echo "== 1/3 I2V training from the T2V weights (TP=2 + SP, 2 CPU ranks)"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py --mm-data examples/tiny/data_i2v.json \
  --mm-model examples/tiny/model_i2v.json --i2v-loss-region all \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --micro-batch-size 1 --global-batch-size 1 --train-iters $ITERS \
  --lr 2e-4 --lr-warmup-iters 2 --weight-decay 1e-4 --clip-grad 1.0 --ema-decay 0.9 --seed 1234 --log-interval 1 \
  --save $OUT/i2v_ckpt --save-interval $ITERS

echo "== 2/3 merge TP shards (EMA weights)"
$PY convert_mm_to_ckpt.py --load_dir $OUT/i2v_ckpt --save_dir $OUT/i2v_merged --ema

echo "== 3/3 generate: first frame given, then a continuation of 9 frames"
$PY inference.py --config examples/tiny/inference_i2v.json --save-path $OUT/i2v_samples/image \
  --image $OUT/data/set2/i_ok.jpg --prompt "a white square moving over a grey background"
$PY inference.py --config examples/tiny/inference_i2v.json --save-path $OUT/i2v_samples/continuation \
  --video $OUT/data/set1/v24_40.mp4 --condition-frames 9 --prompt "a white square moving over a grey background"
ls -l $OUT/i2v_samples/*
echo "I2V demo finished: checkpoints in $OUT/i2v_ckpt, merged weights in $OUT/i2v_merged, videos in $OUT/i2v_samples"
