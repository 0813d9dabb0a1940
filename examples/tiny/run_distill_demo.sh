#!/usr/bin/env bash
# Few-step distillation demo on CPU (docs/distillation.md), from the model run_demo.sh trains (run it first):
#   1. distil a 4-step student (base + LoRA) of the demo's merged EMA weights, TP=2 + SP on 2 CPU processes, stop
#   2. resume the adapters (--lora-load) and train to the end
#   3. fold the student (the EMA of its adapters) into standalone weights that record its schedule
#      (convert_mm_to_ckpt.py --lora-merge --ema)
#   4. sample with the student (4 steps, no CFG: read from the weights) and with the teacher (50 guided steps)
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
ITERS=${ITERS:-40}
HALF=$((ITERS / 2))
need_base_demo "teacher this demo distils"
rm -rf "$OUT/distill_ckpt" "$OUT/student" "$OUT/distill_samples"

TRAIN_ARGS="--mm-data examples/tiny/data.json --mm-model $OUT/model.json \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --micro-batch-size 1 --global-batch-size 1 --train-iters $ITERS --train-epochs 10 \
  --lr 1e-3 --lr-warmup-iters 4 --weight-decay 0 --clip-grad 1.0 --ema-decay 0.9 --seed 4321 --log-interval 5 \
  --load $BASE --lora-r 16 --lora-alpha 16 \
  --distill trajectory --distill-student-steps 4 --distill-teacher-substeps 6 \
  --distill-guidance-scale 8 --distill-guidance-rescale 0.7 --distill-shift 7 --distill-text-length 64 \
  --save $OUT/distill_ckpt --save-interval $HALF"

echo "== 1/4 distil a 4-step student (TP=2 + SP, 2 CPU ranks), stop at iteration $HALF"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --exit-interval $HALF

echo "== 2/4 resume the student from $OUT/distill_ckpt and train to iteration $ITERS"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --lora-load $OUT/distill_ckpt

echo "== 3/4 fold the student into standalone weights (its schedule goes with them)"
$PY convert_mm_to_ckpt.py --lora-merge --ema --load_dir $OUT/distill_ckpt --base $BASE --save_dir $OUT/student

PROMPT="a white square moving over a grey background"
echo "== 4/4 sample: the student (4 steps, CFG folded in), then the teacher (50 steps with CFG)"
$PY inference.py --config $OUT/inference.json --predictor-weights $OUT/student/model_ema.safetensors \
  --save-path $OUT/distill_samples/student --prompt "$PROMPT"
$PY inference.py --config $OUT/inference.json --predictor-weights $BASE --num-inference-steps 50 \
  --save-path $OUT/distill_samples/teacher --prompt "$PROMPT"
ls -l $OUT/distill_samples/*
echo "distillation demo finished: student weights in $OUT/student, videos in $OUT/distill_samples"
