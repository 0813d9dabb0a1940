#!/usr/bin/env bash
# LoRA fine-tuning of the released Open-Sora Plan v1.5 weights (docs/lora.md), one or more nodes: the T2V launcher
# with fine-tuning hyper-parameters and the LoRA flags (later flags override the launcher's). Same cluster
# variables as the T2V launcher. BASE is the released model_ema.pt (or our merged weights, or a training
# checkpoint folder, at any TP); the checkpoints in PROJECT_DIR hold the adapters only. Afterwards:
# convert_mm_to_ckpt.py --lora-merge --load_dir $PROJECT_DIR --base $BASE --save_dir OUT,
# or inference.py ... --predictor-weights $BASE --lora $PROJECT_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export TP=${TP:-4}
export PROJECT_DIR=${PROJECT_DIR:-./save_dir/opensoraplan1.5_lora}
export WANDB_EXP_NAME=${WANDB_EXP_NAME:-finetune_lora}
BASE=${BASE:-./ckpt/opensoraplan1.5/model_ema.pt}
exec bash "$HERE/pretrain_opensoraplan1_5.sh" \
    --lr 1e-4 --min-lr 1e-4 --lr-warmup-init 1e-4 --weight-decay 0.0 \
    --train-iters "${TRAIN_ITERS:-5000}" --save-interval 500 \
    --load "$BASE" \
    --lora-load "$PROJECT_DIR" \
    --lora-r "${LORA_R:-64}" \
    --lora-alpha "${LORA_ALPHA:-64}" \
    --lora-dropout 0.0 \
    --lora-target-modules to_q to_k to_v to_out.0 add_q_proj add_k_proj add_v_proj to_add_out \
                          ff.net.0.proj ff.net.2 ff_enc.net.0.proj ff_enc.net.2 \
    "$@"
