#!/usr/bin/env bash
# README command 1: install (if needed) and run the quickstart distillation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh base
. .venv/bin/activate
exec distill quickstart "$@"
