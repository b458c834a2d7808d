#!/usr/bin/env bash
# The CPU tests of the vLLM glue (spec, plugin hook, backend) against newer vLLM releases' Python sources, laid
# over the tested environment (.venv, vLLM 0.26 with its compiled parts, torch 2.11). Python-level only: it shows
# whether the backend still fits vLLM's interfaces, not that the engine runs (newer vLLM needs a newer torch).
#   bash scripts/check_vllm_api.sh 0.29.0 0.33.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/test.sh --co -q >/dev/null  # creates .venv
work=${TMPDIR:-/tmp}/turboquant_vllm_api
for version in "$@"; do
  overlay="$work/$version"
  if [ ! -f "$overlay/vllm/__init__.py" ]; then
    mkdir -p "$work/wheels" "$overlay"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "vllm==$version" -d "$work/wheels"
    .venv/bin/python - "$work/wheels" "$version" "$overlay" <<'PY'
import pathlib, sys, zipfile
wheels, version, overlay = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
with zipfile.ZipFile(wheel) as zf:  # the package's Python files only; compiled parts come from .venv
    zf.extractall(overlay, [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")])
PY
  fi
  echo "== vLLM $version (Python sources from $overlay)"
  # Left out: the layer tests that only run kernels (slow under the interpreter), and the FLASHINFER hook case,
  # which imports .venv's flashinfer, older than newer vLLM's Python expects.
  PYTHONPATH="$overlay" .venv/bin/python -m pytest -q -p no:cacheprovider tests/vllm/test_spec.py \
    tests/vllm/test_plugin.py tests/vllm/test_backend.py \
    -k "not layer_output and not calibrated and not exact_sinks and not FLASHINFER" 2>&1 | tail -3
done
