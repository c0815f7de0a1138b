#!/usr/bin/env bash
# Diagnostic: PyTorch with expandable segments under devproxy, every driver call traced; writes the calls that did
# not succeed and the last 200 lines to $OUT/exp-trace.txt. Run on the GPU host from the repository root.
set -u
B=${GPU_BIN:-$PWD/.gpu}
TPY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
export DEVPROXY_SHIM="$B/libdevproxy_interpose.so" PYTHONUNBUFFERED=1
T=/tmp/exp-trace.txt
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True DEVPROXY_LOG=trace timeout "${1:-60}" "$B/devproxy" run --backend cuda -- \
  "$TPY" gpu/torch_train.py --model transformer --steps 2 >/tmp/exp.out 2>"$T"
echo "exit $? stdout: $(cat /tmp/exp.out | tr '\n' ' ')"
{ grep -v ' -> CUDA_SUCCESS$' "$T" | grep -v '^devproxy: cu[A-Za-z_0-9]* -> CUDA_SUCCESS' | grep -v '^  File\|^    ' | head -n 80; echo ...; tail -n 200 "$T"; } >"${OUT:-/tmp}/exp-trace.txt"
grep -v ' -> CUDA_SUCCESS$' "$T" | grep -E ' -> CUDA_ERROR|error' | head -n 10
