#!/usr/bin/env bash
# Open-Sora Plan v1.5 image-to-video / continuation training (docs/i2v.md), initialised from the T2V release:
# the model JSON names the inpaint predictor and the T2V weights (their patch embedding is widened with zero
# condition channels), the data JSON the per-sample mask types. Same cluster variables as the T2V launcher:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 TP=8 bash examples/opensoraplan1.5/pretrain_i2v_opensoraplan1_5.sh
# I2V_LOSS_REGION=all (every latent frame, as Open-Sora Plan 1.3) or generated (frames with a generated frame).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export MM_DATA=${MM_DATA:-$HERE/data_i2v.json}
export MM_MODEL=${MM_MODEL:-$HERE/model_opensoraplan1_5_i2v.json}
export PROJECT_DIR=${PROJECT_DIR:-./save_dir/opensoraplan1.5_i2v}
exec bash "$HERE/pretrain_opensoraplan1_5.sh" --i2v-loss-region "${I2V_LOSS_REGION:-all}" "$@"
