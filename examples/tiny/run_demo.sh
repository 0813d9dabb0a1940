#!/usr/bin/env bash
# The embedded end-to-end demo on CPU (a few minutes on 2 cores), everything under demo_out/:
#   1. synthetic videos/images with captions; tiny random-weight WF-VAE, T5 and CLIP folders
#   2. train the tiny SparseUMMDiT with TP=2 + sequence parallel on 2 CPU processes, save, stop
#   3. resume from the checkpoint and train to the end
#   4. merge the TP shards, taking the EMA weights
#   5. generate a video from a prompt with the merged EMA weights
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank on small CPUs (and no torchrun banner)
OUT=demo_out
ITERS=${ITERS:-40}
HALF=$((ITERS / 2))
rm -rf "$OUT/ckpt" "$OUT/merged" "$OUT/samples"

echo "== 1/5 synthetic dataset and tiny models"
$PY -m mindspeed_mm_osp.tools.make_synthetic_dataset "$OUT/data" --overwrite
$PY -m mindspeed_mm_osp.tools.make_tiny_models "$OUT/models" --overwrite

TRAIN_ARGS="--mm-data examples/tiny/data.json --mm-model examples/tiny/model.json \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --micro-batch-size 1 --global-batch-size 1 --train-iters $ITERS \
  --lr 2e-4 --lr-warmup-iters 4 --lr-decay-style cosine --min-lr 2e-5 --weight-decay 1e-4 --clip-grad 1.0 \
  --ema-decay 0.99 --seed 1234 --log-interval 1 --save $OUT/ckpt --save-interval $HALF --train-epochs 2 \
  --mm-valid-data examples/tiny/data.json --eval-interval $HALF --eval-iters 4 \
  --validation-prompts examples/tiny/validation_prompts.txt --validation-interval $ITERS"

echo "== 2/5 train (TP=2 + SP, 2 CPU ranks), stop at iteration $HALF"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --exit-interval $HALF

echo "== 3/5 resume from $OUT/ckpt and train to iteration $ITERS"
$TORCHRUN --standalone --nproc_per_node 2 pretrain.py $TRAIN_ARGS --load $OUT/ckpt

echo "== 4/5 merge TP shards (EMA weights)"
$PY convert_mm_to_ckpt.py --load_dir $OUT/ckpt --save_dir $OUT/merged --ema

echo "== 5/5 generate"
$PY inference.py --config examples/tiny/inference.json --predictor-weights $OUT/merged/model_ema.safetensors \
  --save-path $OUT/samples --prompt "a white square moving over a grey background"
ls -l $OUT/samples
echo "demo finished: videos in $OUT/samples, checkpoints in $OUT/ckpt, merged weights in $OUT/merged"
