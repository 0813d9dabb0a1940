#!/usr/bin/env bash
# The CUDA device check: one command for a lent, offline GPU machine (one H100/H200; at most 7 minutes there).
#
#   bash scripts/device_check.sh [--wheels DIR] [--out DIR]   run it (wheels: .whl; report: $OUT, else ./device_report)
#   bash scripts/device_check.sh --dry-run                     list the steps, their commands and time budgets
#   bash scripts/device_check.sh --simulate                    prove here, with the network cut, that it needs none
#
# The machine reaches no package registry. It runs on that machine's own `python3` and CUDA torch (never installs
# torch); the few packages its image lacks travel as wheels in .whl/ (made here by scripts/device_wheels.sh) and are
# installed with `pip install --no-index --no-deps --target <tmp>`; the project runs from this checkout through
# PYTHONPATH. Every step has its own `timeout`; the budgets add up to 420 s. Results: $OUT/report.json (every
# step's status, log tail and figures), $OUT/summary.txt (one line), $OUT/mfu_profile.txt (torch profiler table of
# the MFU step's top kernels) and $OUT/logs.tar.gz (all logs and raw outputs).
#
# --simulate (here, with the registry reachable): builds a fresh venv in .device-sim/ holding the local CPU torch and
# the packages the machine's image provides, fetches the CPython 3.11 wheels with device_wheels.sh, then reruns this
# script inside `unshare -n` (a network namespace with only loopback) on that venv: the wheel install and every step,
# each step that needs CUDA in its small CPU form (the gpu tests skip cleanly). Budgets are x6 there (2 shared cores).
set -uo pipefail
cd "$(dirname "$0")/.."
export ROOT=$PWD
MODE=run
export PY=python3 WHL=.whl CUDA=1 SCALE=1
OUT_DIR="${OUT:-$ROOT/device_report}"
SIM=.device-sim
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --simulate) MODE=simulate ;;
    --offline-cpu) CUDA=0 SCALE=6 ;;  # internal: the half of --simulate that runs inside `unshare -n`
    --python) PY="${2:?--python needs an interpreter}"; shift ;;
    --wheels) WHL="${2:?--wheels needs a folder}"; shift ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    *) echo "device_check.sh: unknown argument $1 (use --dry-run, --simulate, --wheels DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
export WORK="${TMPDIR:-/tmp}/osp-device-check.$$" SITE="${TMPDIR:-/tmp}/osp-device-site.$$"
export PYTHONPATH="$ROOT:$SITE" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$CUDA" = 1 ]; then export OSP_DEVICE=cuda OMP_NUM_THREADS=8; else export OSP_DEVICE=cpu OMP_NUM_THREADS=1; fi

# ------------------------------------------------------------------------------------------------- the steps
# name|budget (s)|what it runs on CUDA (the function step_<name> below; --offline-cpu runs its CPU form)
STEPS=(
  "env|10|nvidia-smi, python3, torch/CUDA versions, free disk; with --offline-cpu: proves the registry is unreachable"
  "install|20|pip install --no-index --no-deps --target \$SITE \$WHL/*.whl; imports every dependency; checks CUDA"
  "gpu-tests|50|pytest -m gpu tests/gpu (fused SDPA skiparse, bf16 fwd/bwd, NCCL, FusedEmaAdamW, chunked VAE decode)"
  "planner|35|bench/bench_planner.py: the memory planner vs torch.cuda.max_memory_allocated"
  "mfu|60|bench/bench_training_throughput.py --release-slice --dtype bf16 at 57x288x512 and 121x576x1024"
  "profile|25|scripts/device_profile.py: torch profiler table of the MFU step's top kernels (57x288x512)"
  "skiparse|20|bench/bench_skiparse.py --dtype bfloat16 --video-tokens 36864 --text-tokens 512 (fused SDPA)"
  "optimizer|20|bench/bench_ema_optimizer.py: FusedEmaAdamW bytes/s vs the device's copy bandwidth"
  "e2e|50|tiny pretrain.py 3 iterations (save at 2, stop, resume to 3), then inference.py writes an mp4, one GPU"
  "latency|120|bench/bench_sampling_latency.py --compile: release-size seconds per video"
)
REPORT_BUDGET=5  # scripts/device_report.py, after the steps

bare_pip() {  # pip without this machine's configuration (local wheel folders, constraints): only what it is given
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip "$@"
}
step_env() {
  if [ "$CUDA" = 1 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || return 1; fi
  "$PY" --version && "$PY" -m pip --version && df -h "$ROOT" | tail -n 1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  if [ "$CUDA" = 0 ]; then  # the registry must be out of reach, or this proves nothing
    if bare_pip download -q --no-deps --no-cache-dir --retries 0 --timeout 5 -d "$WORK/probe" ftfy 2>/dev/null; then
      echo "network: a package registry answered inside the namespace" >&2; return 1
    fi
    echo "network: no registry reachable (pip download failed, as intended)"
  fi
}
step_install() {
  if ! ls "$WHL"/*.whl >/dev/null; then
    echo "no wheels in $WHL: run scripts/device_wheels.sh where a registry answers" >&2
    return 1
  fi
  bare_pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || return 1
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os
for mod, dist in (("torch", "torch"), ("megatron.core", "megatron-core"), ("av", "av"), ("ftfy", "ftfy"),
                  ("transformers", "transformers"), ("safetensors", "safetensors"), ("tokenizers", "tokenizers"),
                  ("sentencepiece", "sentencepiece"), ("einops", "einops"), ("tqdm", "tqdm"), ("PIL", "pillow"),
                  ("google.protobuf", "protobuf"), ("psutil", "psutil"), ("numpy", "numpy"), ("xxhash", "xxhash"),
                  ("pytest", "pytest")):
    m = importlib.import_module(mod)
    print(f"{dist:14s} {md.version(dist):12s} {os.path.dirname(m.__file__)}")
from mindspeed_mm_osp import platform
print("accelerator", platform.accelerator(), platform.device_name())
EOF
}
step_gpu_tests() {
  "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml="$WORK/gpu_tests.xml"
}
step_planner() {
  if [ "$CUDA" = 1 ]; then "$PY" bench/bench_planner.py --json "$WORK/planner.json"
  else "$PY" bench/bench_planner.py --quick; fi
}
step_mfu() {
  if [ "$CUDA" = 0 ]; then "$PY" bench/bench_training_throughput.py --quick --json "$WORK/mfu_tiny.json"; return; fi
  "$PY" bench/bench_training_throughput.py --release-slice --dtype bf16 --json "$WORK/mfu_57x288x512.json" &&
    "$PY" bench/bench_training_throughput.py --release-slice --dtype bf16 --latent 16 72 128 \
      --json "$WORK/mfu_121x576x1024.json"
}
step_profile() {
  if [ "$CUDA" = 1 ]; then "$PY" scripts/device_profile.py "$WORK"
  else "$PY" scripts/device_profile.py "$WORK" --tiny; fi
}
step_skiparse() {
  if [ "$CUDA" = 1 ]; then "$PY" bench/bench_skiparse.py --dtype bfloat16 --video-tokens 36864 --text-tokens 512
  else "$PY" bench/bench_skiparse.py --quick; fi
}
step_optimizer() {
  if [ "$CUDA" = 1 ]; then "$PY" bench/bench_ema_optimizer.py; else "$PY" bench/bench_ema_optimizer.py --quick; fi
}
step_e2e() {
  local dir="$WORK/e2e" prompt="a white square moving over a grey background"
  mkdir -p "$dir" && cd "$dir" || return 1  # the tiny JSONs name ./demo_out/...: made here, not in the checkout
  "$PY" -c 'from mindspeed_mm_osp.tools.make_synthetic_dataset import make_synthetic_dataset as data
from mindspeed_mm_osp.tools.make_tiny_models import make_tiny_models as models
data("demo_out/data"); models("demo_out/models")' || return 1
  local args=(--mm-data "$ROOT/examples/tiny/data.json" --mm-model "$ROOT/examples/tiny/model.json"
              --micro-batch-size 1 --global-batch-size 1 --train-iters 3 --lr 2e-4 --seed 1234 --log-interval 1
              --save ckpt --save-interval 2)
  "$PY" "$ROOT/pretrain.py" "${args[@]}" --exit-interval 2 || return 1
  "$PY" "$ROOT/pretrain.py" "${args[@]}" --load ckpt 2>&1 | tee resume.log
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  if ! grep -q "resumed from .* at iteration 2" resume.log; then
    echo "e2e: the second run did not resume at iteration 2" >&2
    return 1
  fi
  "$PY" "$ROOT/inference.py" --config "$ROOT/examples/tiny/inference.json" --predictor-weights ckpt \
    --save-path samples --prompt "$prompt" || return 1
  ls -l samples/*.mp4 && echo "e2e: trained 2 iterations, resumed from the checkpoint to 3, wrote samples/*.mp4"
}
step_latency() {
  if [ "$CUDA" = 1 ]; then
    "$PY" bench/bench_sampling_latency.py --compile --iters 2 --budget-s 100 --json "$WORK/sampling_latency.json"
  else "$PY" bench/bench_sampling_latency.py --quick --json "$WORK/sampling_latency.json"; fi
}
export -f bare_pip step_env step_install step_gpu_tests step_planner step_mfu step_profile step_skiparse \
  step_optimizer step_e2e step_latency

# ------------------------------------------------------------------------------------------------- the modes
dry_run() {
  local total=$REPORT_BUDGET
  echo "device_check.sh: steps, each under its own timeout (s), writing report.json + summary.txt to $OUT_DIR"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name budget what <<<"$s"
    total=$((total + budget))
    printf '  %-10s %4ss  %s\n' "$name" "$budget" "$what"
  done
  printf '  %-10s %4ss  %s\n' report "$REPORT_BUDGET" "scripts/device_report.py: report.json, summary.txt"
  echo "  total budget: $total s (the run ends within 420 s = 7 minutes)"
  echo "  device command (carry .whl): bash scripts/device_check.sh"
}

run_steps() {
  mkdir -p "$WORK" "$OUT_DIR" && : > "$WORK/steps.tsv"
  local start_all=$SECONDS
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name budget what <<<"$s"
    local limit=$((budget * SCALE)) start=$SECONDS
    echo "=== $name (budget ${limit}s)"
    (cd "$ROOT" && timeout -k 5 "$limit" bash -c "step_${name//-/_}") > "$WORK/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$WORK/steps.tsv"
    tail -n 4 "$WORK/$name.log"
    if [ "$name" = install ] && [ "$rc" -ne 0 ]; then
      echo "install failed (rc=$rc): the later steps need its packages; see install.log" >&2
      break
    fi
  done
  echo "wall time: $((SECONDS - start_all)) s"
  timeout "$REPORT_BUDGET" python3 scripts/device_report.py "$WORK" "$OUT_DIR" "$((SECONDS - start_all))"
  local rc=$?
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" . 2>/dev/null
  rm -rf "$WORK" "$SITE"
  return $rc
}

simulate() {
  set -e
  local venv="$ROOT/$SIM/venv"
  rm -rf "${ROOT:?}/$SIM" && mkdir -p "$ROOT/$SIM"
  echo "== simulate 1/3: a fresh venv standing in for the machine's image (local CPU torch + the image's packages)"
  python3 -m venv "$venv"
  # simulation only: the stand-in image's torch is the local CPU build that constraints.txt pins (the GPU run
  # itself never installs torch)
  "$venv/bin/python" -m pip install -q -c constraints.txt torch
  # versions as the machine's image lists them where known; the project's own dependencies are NOT installed here
  "$venv/bin/python" -m pip install -q -c constraints.txt transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 \
    sentencepiece==0.2.2 numpy packaging psutil protobuf einops tqdm pillow xxhash pytest pytest-timeout hypothesis
  echo "== simulate 2/3: the CPython 3.11 wheels (device_wheels.sh --python-version 3.11)"
  bash scripts/device_wheels.sh --python-version 3.11 --dest "$SIM/whl"
  echo "== simulate 3/3: the check inside unshare -n (loopback only), on that venv"
  set +e
  unshare -n bash -c 'ip link set lo up && exec bash scripts/device_check.sh --offline-cpu "$@"' _ \
    --python "$venv/bin/python" --wheels "$SIM/whl" --out "$ROOT/$SIM/out"
  local rc=$?
  echo "simulate: rc=$rc; $(cat "$ROOT/$SIM/out/summary.txt" 2>/dev/null)"
  return $rc
}

case "$MODE" in
  dry) dry_run ;;
  simulate) simulate ;;
  run) run_steps ;;
esac
