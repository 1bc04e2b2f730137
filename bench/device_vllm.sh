#!/usr/bin/env bash
# GPU check of `safesteer serve --engine vllm` (run on a machine with a GPU, from the repository root):
# the vLLM tests (parity with the HF engine, cache isolation, faults) and the engine benchmark at 1/8/32/64
# streams. Needs a venv with safesteer and the GPU build of vLLM (`pip install -e ".[test]" vllm==0.32.0`);
# VENV=path overrides .venv. Bounded: each step under `timeout`. Results land in ${OUT:-bench/out}.
set -euo pipefail
VENV=${VENV:-.venv}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY="$VENV/bin/python"
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee "$OUT/device_vllm_env.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/device_vllm_env.txt" || true
# parity + isolation + faults (one engine for the session)
timeout 900 "$PY" -m pytest tests/test_serve_vllm.py tests/test_serve_vllm_hooks.py -q -p no:cacheprovider \
  2>&1 | tail -20 | tee "$OUT/device_vllm_tests.txt"
# throughput: vLLM with policies vs plain vs HF (threads: the GPU does the work)
timeout 1200 "$PY" bench/serve_engine.py --streams 1 8 32 64 --threads 4 --out "$OUT/serve_engine.json" \
  2>&1 | tail -20 | tee "$OUT/device_vllm_bench.txt"
