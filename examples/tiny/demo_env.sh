# Sourced by the tiny demos: run from the repository root with the venv's tools, one thread per rank, and write
# everything under demo_out/.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank on small CPUs (and no torchrun banner)
OUT=demo_out
BASE=$OUT/merged/model_ema.safetensors  # what run_demo.sh trains; the LoRA, I2V and distillation demos start from it

# need_base_demo WHAT: stop unless run_demo.sh has run (its merged weights and its latent normalisation)
need_base_demo() {
  if [ ! -f "$BASE" ] || [ ! -f "$OUT/model.json" ]; then
    echo "no $BASE or $OUT/model.json: run examples/tiny/run_demo.sh first (it trains the $1)" >&2
    exit 1
  fi
}
