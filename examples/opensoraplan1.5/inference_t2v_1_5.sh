#!/usr/bin/env bash
# Open-Sora Plan v1.5 text-to-video sampling on one node (any number of devices).
# TP shards the predictor, CP splits each video's tokens; the remaining factor (devices / (TP x CP)) splits the
# prompts (data parallel).
#   TP=4 NPUS_PER_NODE=8 bash examples/opensoraplan1.5/inference_t2v_1_5.sh
#   CONFIG=examples/tiny/inference.json TP=2 NPUS_PER_NODE=2 bash examples/opensoraplan1.5/inference_t2v_1_5.sh
# Extra arguments are passed to inference.py (e.g. --prompt "a cat" --seed 7 --save-latents).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-12346}
if [ -z "${NPUS_PER_NODE:-}" ]; then
  NPUS_PER_NODE=$($PYTHON -c "from mindspeed_mm_osp.platform.device import device_count; print(device_count())")
fi
TP=${TP:-4}
CP=${CP:-1}   # Ulysses context parallelism: CP ranks share one video's token sequence
if [ $((NPUS_PER_NODE % (TP * CP))) -ne 0 ]; then
  echo "TP=$TP x CP=$CP must divide NPUS_PER_NODE=$NPUS_PER_NODE" >&2
  exit 2
fi

# ---- Ascend (torch_npu + MindSpeed) -------------------------------------------------------
if $PYTHON -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch_npu') is None)"; then
  source /usr/local/Ascend/ascend-toolkit/set_env.sh 2>/dev/null || true
  export ASCEND_SLOG_PRINT_TO_STDOUT=0
  export ASCEND_GLOBAL_LOG_LEVEL=3
  export TASK_QUEUE_ENABLE=0
  export HCCL_CONNECT_TIMEOUT=1800
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron sequence parallel

CONFIG=${CONFIG:-./examples/opensoraplan1.5/inference_t2v_model1_5.json}
SEED=${SEED:-1235}

$TORCHRUN --nproc_per_node "$NPUS_PER_NODE" --nnodes 1 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO_ROOT/inference.py" \
    --config "$CONFIG" \
    --tensor-model-parallel-size "$TP" \
    --context-parallel-size "$CP" \
    --seed "$SEED" \
    "$@"
