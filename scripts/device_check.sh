#!/usr/bin/env bash
# One command for a lent CUDA machine (one H100/H200, < 8 min): install a CUDA torch, run the `gpu` tests and the
# GPU benchmarks, write one JSON report.
#
#   bash scripts/device_check.sh [--dry-run] [--out DIR]     (DIR defaults to $OUT, else ./device_report)
#
# --dry-run prints every step with its command and time budget and runs nothing (works on CPU).
# Steps (budget in seconds, each enforced by `timeout`; 450 s in all):
#   1 env        nvidia-smi, python, free disk
#   2 install    .venv-cuda: torch==2.13.0, the registry's default Linux build (CUDA 13.0: cuda-toolkit 13.0.3,
#                cuDNN 9.20, NCCL 2.29.7, triton 3.7.1; needs an NVIDIA driver for CUDA 13), and the package with
#                test extras; fails here, with the reason, if CUDA is not usable (OSP_DEVICE=cuda)
#   3 gpu-tests  pytest -m gpu (tests/gpu): fused SDPA through skiparse, bf16 fwd/bwd vs CPU fp32, NCCL
#                single-rank groups, FusedEmaAdamW on CUDA vs AdamW+EMA, chunked VAE decode
#   4 planner    bench/bench_planner.py: the planner vs saved-tensor bytes and CUDA peak allocated memory
#   5 mfu        bench/bench_training_throughput.py --release-slice --dtype bf16, at 57x288x512 and 121x576x1024
#   6 skiparse   bench/bench_skiparse.py --dtype bfloat16 (skiparse vs dense attention step time)
#   7 optimizer  bench/bench_ema_optimizer.py (fused EMA AdamW bytes/s vs copy bandwidth)
#   8 report     scripts/device_report.py: one JSON (versions, device, every step's status, log tail, figures)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT_DIR="${OUT:-$PWD/device_report}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    *) echo "device_check.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
VENV=.venv-cuda
PY="$VENV/bin/python"
export OMP_NUM_THREADS=4 PYTHONPATH="$PWD" OSP_DEVICE=cuda PYTORCH_NVML_BASED_CUDA_CHECK=1

# name | budget (s) | command
STEPS=(
  "env|10|nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && python3 --version && df -h ."
  "install|170|python3 -m venv $VENV && PIP_FIND_LINKS= PIP_CONSTRAINT= $PY -m pip install -q torch==2.13.0 && PIP_FIND_LINKS= $PY -m pip install -q -c constraints.txt -e '.[test]' && $PY -c 'import torch; from mindspeed_mm_osp import platform; print(torch.__version__, \"CUDA\", torch.version.cuda, platform.device_name())'"
  "gpu-tests|75|$PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml=$OUT_DIR/gpu_tests.xml"
  "planner|40|$PY bench/bench_planner.py --json $OUT_DIR/planner.json"
  "mfu|110|$PY bench/bench_training_throughput.py --release-slice --dtype bf16 --json $OUT_DIR/mfu_57x288x512.json && $PY bench/bench_training_throughput.py --release-slice --dtype bf16 --latent 16 72 128 --json $OUT_DIR/mfu_121x576x1024.json"
  "skiparse|20|$PY bench/bench_skiparse.py --dtype bfloat16 --video-tokens 36864 --text-tokens 512"
  "optimizer|20|$PY bench/bench_ema_optimizer.py"
)

if [ "$DRY" = 1 ]; then
  echo "device_check.sh --dry-run: would run, writing $OUT_DIR/report.json"
  total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name budget cmd <<<"$s"
    total=$((total + budget))
    printf '  %-10s %4ss  %s\n' "$name" "$budget" "$cmd"
  done
  printf '  %-10s %4ss  %s\n' "report" "5" "python3 scripts/device_report.py $OUT_DIR"
  echo "  total budget: $((total + 5)) s (< 480 s)"
  exit 0
fi

mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name budget cmd <<<"$s"
  echo "=== $name (budget ${budget}s): $cmd"
  start=$(date +%s)
  timeout "$budget" bash -c "$cmd" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT_DIR/steps.tsv"
  tail -n 5 "$OUT_DIR/$name.log"
  if [ "$name" = install ] && [ "$rc" -ne 0 ]; then
    echo "install failed (rc=$rc): later steps need a CUDA torch; see $OUT_DIR/install.log" >&2
    break
  fi
done
python3 scripts/device_report.py "$OUT_DIR"
