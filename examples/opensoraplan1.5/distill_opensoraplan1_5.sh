#!/usr/bin/env bash
# Few-step distillation of the released Open-Sora Plan v1.5 weights (docs/distillation.md), one or more nodes: the
# T2V launcher (TP 8 + sequence parallel, its recompute and distributed optimizer) with the distillation flags
# (later flags override the launcher's). Same cluster variables as the T2V launcher. BASE is the released
# model_ema.pt (or our merged weights, or a training checkpoint folder, at any TP): it is the frozen teacher and the
# student's base, one copy of the weights for both. The student is BASE + LoRA adapters (r=64); the checkpoints in
# PROJECT_DIR hold the adapters and their EMA (decay EMA_DECAY, 0.995 by default: a distillation run is a few
# thousand iterations, and the pre-training launcher's 0.9999 would barely leave the zero-initialised adapters) and
# record the student's schedule. Afterwards, fold the EMA adapters into standalone weights:
# convert_mm_to_ckpt.py --lora-merge --ema --load_dir $PROJECT_DIR --base $BASE --save_dir OUT, then
# inference.py --config examples/opensoraplan1.5/inference_t2v_model1_5.json \
#     --predictor-weights OUT/model_ema.safetensors   (4 steps, no CFG: read from the file)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export TP=${TP:-8}
export PROJECT_DIR=${PROJECT_DIR:-./save_dir/opensoraplan1.5_distill}
export WANDB_EXP_NAME=${WANDB_EXP_NAME:-distill}
BASE=${BASE:-./ckpt/opensoraplan1.5/model_ema.pt}
exec bash "$HERE/pretrain_opensoraplan1_5.sh" \
    --lr 1e-4 --min-lr 1e-4 --lr-warmup-init 1e-4 --weight-decay 0.0 \
    --train-iters "${TRAIN_ITERS:-2000}" --save-interval 250 \
    --ema-decay "${EMA_DECAY:-0.995}" \
    --load "$BASE" \
    --lora-load "$PROJECT_DIR" \
    --lora-r "${LORA_R:-64}" \
    --lora-alpha "${LORA_ALPHA:-64}" \
    --distill trajectory \
    --distill-student-steps "${STUDENT_STEPS:-4}" \
    --distill-teacher-substeps "${TEACHER_SUBSTEPS:-12}" \
    --distill-guidance-scale 8.0 \
    --distill-guidance-rescale 0.7 \
    --distill-shift 7.0 \
    --distill-text-length 512 \
    "$@"
