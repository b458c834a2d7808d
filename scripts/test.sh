#!/usr/bin/env bash
# The test suite: CPU tests (Triton kernels under TRITON_INTERPRET=1) plus lint; `gpu` tests run on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ruff check src tests benchmarks scripts
python -m pytest -m "not gpu" -q "$@"
