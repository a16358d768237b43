#!/usr/bin/env bash
# The GPU check, one prepared script: on an NVIDIA GPU, run the gpu-marked tests and the
# benchmark (1,000,000 scenarios × 10,000 loans × 12 quarters included) in under 8 minutes.
#
#   OUT=/some/folder bench/gpu_check.sh        (from the repository root; OUT defaults to
#                                              bench/results/gpu-run; PYTHON picks the
#                                              interpreter, BENCH_ARGS=--quick a short run)
# Needs: jax[cuda13], cupy-cuda13x, pyarrow, numpy, pytest (no network, nothing installed).
# Writes at most 6 files, all directly under $OUT:
#   environment.txt   nvidia-smi, versions, the devices JAX and CuPy see
#   pytest-gpu.txt    `pytest -m gpu` output
#   bench-log.txt     the benchmark's progress
#   bench-gpu.json    the benchmark's results (rewritten after every case)
#   bench-gpu.md      the same as a markdown table
#   summary.txt       exit status and seconds of every step
# Every step has a hard timeout; the benchmark gets what is left of the 8 minutes, and its
# own budget drops the least important cases first, so a slow machine still records the
# 1,000,000 × 10,000 × 12 forward run and the tail gradients.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
TOTAL=470            # seconds: 8 minutes less a margin for the copy-back
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
step() {  # step NAME SECONDS COMMAND... : run with a hard timeout, record status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "$name: exit $rc in $(( SECONDS - t0 )) s (limit $limit s)" >> "$OUT/summary.txt"
  return $rc
}
: > "$OUT/summary.txt"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "jax", "jaxlib", "cupy", "pyarrow", "pytest", "scipy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", e)
import jax
print("jax devices:", jax.devices())
from gpucredit.kernels import cupy_engine
print("cupy available:", cupy_engine.available())
EOF
} > "$OUT/environment.txt" 2>&1
echo "environment: $(( SECONDS - START )) s" >> "$OUT/summary.txt"

# 1. the gpu-marked tests (CuPy kernel and JAX on the GPU against the NumPy reference)
step pytest-gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --continue-on-collection-errors tests \
  > "$OUT/pytest-gpu.txt" 2>&1

# 2. the benchmark: whatever time is left, minus 10 s
LIMIT=$(( $(left) - 10 ))
if [ "$LIMIT" -gt 60 ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS (e.g. --quick) is split on purpose
  step bench "$LIMIT" "$PY" -m gpucredit.benchmark --out "$OUT" --name bench-gpu ${BENCH_ARGS:-} \
    > "$OUT/bench-log.txt" 2>&1
else
  echo "bench: not run, only $LIMIT s left" >> "$OUT/summary.txt"
fi
echo "total: $(( SECONDS - START )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
ls -la "$OUT"
