#!/usr/bin/env bash
# Create .venv-llamacpp: llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) in its own
# virtual environment, used by the echo-protocol tests in tests/teachers/test_served.py. Optional: those
# tests skip when it is missing. PyPI ships llama-cpp-python as source only, so a fresh machine compiles
# llama.cpp here (several minutes on 2 cores; pip caches the wheel for the next time).
#
# Idempotent: a stamp file records what was installed. Prints the environment's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
LLAMA_CPP_VERSION="0.3.36"

quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp="$VENV/.distill-llamacpp-installed"
want="$(sha256sum scripts/setup_llamacpp.sh | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && grep -qx -- "$want" "$stamp"; then
  echo "$(cd "$VENV" && pwd)/bin/python"
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
vpy="$VENV/bin/python"
quiet "$vpy" -m pip install -q --upgrade pip >/dev/null || true
quiet "$vpy" -m pip install -q "llama-cpp-python[server]==${LLAMA_CPP_VERSION}"
"$vpy" -c "import llama_cpp.server.app" || {
  echo "setup_llamacpp.sh: llama-cpp-python installed but its server does not import" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "setup_llamacpp.sh: ready in $(( $(date +%s) - start )) s" >&2
echo "$(cd "$VENV" && pwd)/bin/python"
