#!/usr/bin/env bash
# Install, then run the embedded CPU demo end to end (see README "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash examples/tiny/run_demo.sh
