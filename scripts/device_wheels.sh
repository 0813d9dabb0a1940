#!/usr/bin/env bash
# Download, where a package registry answers, the wheels that the offline CUDA machine lacks, so that
# scripts/device_check.sh can install them there with no network (it carries the folder with the checkout).
#
#   bash scripts/device_wheels.sh [--python-version 3.12] [--dest .whl]
#
# The machine's image (python3 3.12, CUDA torch 2.11) already holds torch, numpy, packaging, psutil, protobuf,
# transformers, tokenizers, safetensors, sentencepiece, einops, tqdm, pillow, xxhash, pytest, pytest-timeout and
# hypothesis. Of pyproject.toml's runtime dependencies it lacks megatron-core, av and ftfy (with ftfy's one
# need, wcwidth); megatron-core needs only torch, numpy and packaging, av needs nothing. decord2 is left out on
# purpose: it is an optional fast path (the readers fall back to PyAV) and its 25 MiB would break the 60 MiB cap.
# Torch is never fetched. --python-version 3.11 fetches the same set for `device_check.sh --simulate` here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV="${2:?--python-version needs a value such as 3.12}"; shift ;;
    --dest) DEST="${2:?--dest needs a folder}"; shift ;;
    *) echo "device_wheels.sh: unknown argument $1 (use --python-version X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
  shift
done
case "$PYV" in 3.1[0-9]) ;; *) echo "device_wheels.sh: --python-version $PYV: expected 3.10 to 3.19" >&2; exit 2 ;; esac

# One pinned version each (two versions of one package stop pip's install there).
WHEELS=(megatron-core==0.16.1 av==18.1.0 ftfy==6.3.1 wcwidth==0.9.4)
MAX_MIB=60
PLATFORMS=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
         manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYV" \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "device_wheels.sh: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  exit 1
fi
bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$DEST"
echo "total: $mib MiB in $count wheels for CPython $PYV, manylinux x86-64 (cap $MAX_MIB MiB)"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "device_wheels.sh: $DEST is $mib MiB, over the $MAX_MIB MiB cap" >&2
  exit 1
fi
echo "device command (carry $DEST with the checkout; it writes \$OUT/report.json and \$OUT/summary.txt):"
echo "  bash scripts/device_check.sh --wheels $DEST"
