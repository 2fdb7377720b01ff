#!/usr/bin/env bash
# Two local vllm serve instances sharing a corpus, one question per mode, then everything stopped.
# Run from the repository root after `make demo` or `make venv` built .venv:  bash examples/two_instances.sh [CORPUS_DIR]
set -euo pipefail
corpus=${1:-$(.venv/bin/python -c 'import pathlib, sqlite3; print(pathlib.Path(sqlite3.__file__).parent)')}
trap '.venv/bin/qroute down' EXIT
.venv/bin/qroute up --instances 2 --corpus "$corpus"
.venv/bin/qroute status
for mode in route fetch auto; do
  .venv/bin/python examples/ask.py --url http://127.0.0.1:8100/v1 --mode "$mode" "Where is the connect function defined?"
done
