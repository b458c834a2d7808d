# Source me (from a script running under set -e): creates .venv on first use and installs the package
# with the extras the tests need.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${TURBOQUANT_VENV:-$ROOT/.venv}
EXTRAS=${TURBOQUANT_EXTRAS:-dev,vllm}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.turboquant-installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$STAMP" ]; then
  # vLLM brings ~8 GB of CUDA wheels: no second, compressed copy of them in pip's cache (CI disks can be tight).
  echo "installing $ROOT[$EXTRAS] into $VENV; free disk: $(df -h "$VENV" | awk 'NR == 2 {print $4}')"
  "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$VENV/bin/python" -m pip install -q --no-cache-dir -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
