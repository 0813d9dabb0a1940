#!/usr/bin/env bash
# LoRA fine-tuning demo on CPU, from the base trained by run_demo.sh (run it first; ~2 minutes on 2 cores):
#   1. LoRA fine-tune the demo's merged EMA weights with TP=2 + sequence parallel on 2 CPU processes, stop
#   2. resume the adapters (--lora-load) and train to the end
#   3. fold the adapters into the base (convert_mm_to_ckpt.py --lora-merge)
#   4. generate with the unmerged adapters (--lora) and with the merged weights
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
ITERS=${ITERS:-20}
HALF=$((ITERS / 2))
need_base_demo "base this demo fine-tunes"
rm -rf "$OUT/lora_ckpt" "$OUT/lora_merged" "$OUT/lora_samples"

TRAIN_ARGS="--mm-data examples/tiny/data.json --mm-model $OUT/model.json \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --micro-batch-size 1 --global-batch-size 1 --train-iters $ITERS \
  --lr 1e-3 --lr-warmup-iters 2 --weight-decay 0 --clip-grad 1.0 --ema-decay 0.9 --seed 4321 --log-interval 1 \
  --load $BASE --lora-r 8 --lora-alpha 16 --lora-target-modules to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2 \
  --save $OUT/lora_ckpt --save-interval $HALF"

echo "== 1/4 LoRA fine-tune (TP=2 + SP, 2 CPU ranks), stop at iteration $HALF"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --exit-interval $HALF

echo "== 2/4 resume the adapters from $OUT/lora_ckpt and train to iteration $ITERS"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --lora-load $OUT/lora_ckpt
du -sh "$OUT/lora_ckpt"

echo "== 3/4 fold the adapters into the base"
$PY convert_mm_to_ckpt.py --lora-merge --load_dir $OUT/lora_ckpt --base $BASE --save_dir $OUT/lora_merged

PROMPT="a white square moving over a grey background"
echo "== 4/4 generate: unmerged adapters on the base, then the merged weights"
$PY inference.py --config $OUT/inference.json --predictor-weights $BASE --lora $OUT/lora_ckpt \
  --save-path $OUT/lora_samples/unmerged --prompt "$PROMPT"
$PY inference.py --config $OUT/inference.json --predictor-weights $OUT/lora_merged/model.safetensors \
  --save-path $OUT/lora_samples/merged --prompt "$PROMPT"
ls -l $OUT/lora_samples/*
echo "LoRA demo finished: adapters in $OUT/lora_ckpt, merged weights in $OUT/lora_merged, videos in $OUT/lora_samples"
