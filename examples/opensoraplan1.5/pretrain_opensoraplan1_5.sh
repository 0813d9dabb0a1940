#!/usr/bin/env bash
# Open-Sora Plan v1.5 pretraining, multi-node. Every node runs this script with the same
# MASTER_ADDR/MASTER_PORT and its own NODE_RANK. Flags follow the reference launcher; extra arguments are
# passed to pretrain.py.
set -euo pipefail

# ---- cluster layout (from the environment; defaults: one node) ---------------------------
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-12345}
if [ -z "${NPUS_PER_NODE:-}" ]; then
  NPUS_PER_NODE=$(python -c "from mindspeed_mm_osp.platform.device import device_count; print(device_count())")
fi
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

# ---- Ascend (torch_npu + MindSpeed) -------------------------------------------------------
if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch_npu') is None)"; then
  source /usr/local/Ascend/ascend-toolkit/set_env.sh 2>/dev/null || true
  export ASCEND_SLOG_PRINT_TO_STDOUT=0
  export ASCEND_GLOBAL_LOG_LEVEL=3
  export TASK_QUEUE_ENABLE=0
  export MULTI_STREAM_MEMORY_REUSE=1
  export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True
  export COMBINED_ENABLE=1
  export CPU_AFFINITY_CONF=1
  export HCCL_CONNECT_TIMEOUT=1800
  export HCCL_OP_BASE_FFTS_MODE_ENABLE=TRUE
fi
# ---- CUDA ---------------------------------------------------------------------------------
export CUDA_DEVICE_MAX_CONNECTIONS=1   # required by Megatron sequence parallel
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
# ---- logging: W&B stays offline unless you set WANDB_MODE=online and WANDB_API_KEY ---------
export WANDB_MODE=${WANDB_MODE:-offline}

TP=${TP:-8}
PP=1
CP=${CP:-1}   # Ulysses context parallelism (--context-parallel-algo ulysses_cp_algo); TP x CP divides the world
MBS=${MBS:-1}
GRAD_ACC_STEP=${GRAD_ACC_STEP:-1}
GBS=$((WORLD_SIZE * GRAD_ACC_STEP * MBS / CP / TP))

MM_DATA=${MM_DATA:-./examples/opensoraplan1.5/data.json}
MM_MODEL=${MM_MODEL:-./examples/opensoraplan1.5/model_opensoraplan1_5.json}
PROJECT_DIR=${PROJECT_DIR:-./save_dir/opensoraplan1.5}
mkdir -p "$PROJECT_DIR"

DISTRIBUTED_ARGS="--nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-layers 32 \
    --hidden-size 3072 \
    --num-attention-heads 16 \
    --seq-length 1024 \
    --max-position-embeddings 1024 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --tokenizer-type NullTokenizer \
    --vocab-size 0 \
    --position-embedding-type rope \
    --rotary-base 500000 \
    --swiglu \
    --no-masked-softmax-fusion \
    --lr 1e-5 \
    --min-lr 1e-5 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --adam-eps 1e-15 \
    --lr-decay-style constant \
    --weight-decay 1e-4 \
    --lr-warmup-init 1e-5 \
    --lr-warmup-iters 0 \
    --clip-grad 1.0 \
    --train-iters 100000000 \
    --no-gradient-accumulation-fusion \
    --use-distributed-optimizer \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 0 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --qk-layernorm \
    --sequence-parallel \
    --optimizer-selection fused_ema_adamw \
    --seed 1024 \
    --data-parallel-random-init \
    --use-ema \
    --load $PROJECT_DIR \
    --bf16 \
    --fp32-residual-connection \
    --attention-softmax-in-fp32 \
    --accumulate-allreduce-grads-in-fp32
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --model_custom_precision \
    --clip_grad_ema_decay 0.99 \
    --selective_recom \
    --recom_ffn_layers 32
"

OUTPUT_ARGS="
    --save $PROJECT_DIR \
    --log-interval 1 \
    --save-interval 1000 \
    --eval-interval 10 \
    --eval-iters 10 \
    --tensorboard-log-interval 1
"
# W&B (pip install wandb) only when a project is named; offline unless WANDB_MODE=online.
if [ -n "${WANDB_PROJECT:-}" ]; then
  OUTPUT_ARGS="$OUTPUT_ARGS --wandb-project $WANDB_PROJECT --wandb-exp-name ${WANDB_EXP_NAME:-pretrain} --wandb-save-dir $PROJECT_DIR --wandb-mode $WANDB_MODE"
fi

torchrun $DISTRIBUTED_ARGS pretrain.py $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" 2>&1 | tee "$PROJECT_DIR/train_node${NODE_RANK}.log"
