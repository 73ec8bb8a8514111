#!/usr/bin/env bash
# Runs every test tier that fits this machine. The Triton interpreter tier must start with
# TRITON_INTERPRET=1 set before triton is imported, so it is a second pytest process.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m "not interpreter" "$@"
TRITON_INTERPRET=1 python -m pytest -q -m interpreter "$@"
