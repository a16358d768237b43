#!/usr/bin/env bash
# The GPU check, one prepared script: on an NVIDIA GPU, in under 7 minutes, measure the tail
# gradient's cost (issue 4), run the JAX engine's tests and the CuPy kernels' tests on the GPU
# (the fused adjoint's against the JAX gradient included), time the CuPy adjoint's tail
# gradient against the CuPy tail forward (issue 19), time the example run, and run the
# benchmark (1,000,000 scenarios × 10,000 loans × 12 quarters first).
#
#   OUT=/some/folder bench/gpu_check.sh        (from the repository root; OUT defaults to
#                                              bench/results/gpu-run; PYTHON picks the
#                                              interpreter, TOTAL the seconds it may take,
#                                              SKIP_CUPY_TESTS=1 skips the CuPy tests)
# Needs: jax[cuda13], cupy-cuda13x, pyarrow, numpy, pytest, pytest-xdist (no network).
# Writes 9 files, all directly under $OUT:
#   environment.txt   nvidia-smi, versions, the devices JAX and CuPy see
#   gradient-gpu.json tail gradient against tail forward (bench/bench_gradient.py)
#   pytest-gpu.txt    the JAX engine's tests with JAX on the GPU, then `pytest -m gpu` (CuPy)
#   gradient-cupy.json the CuPy adjoint's tail gradient against the CuPy tail forward,
#                     10,000 tail scenarios × 10,000 loans (bench_gradient.py --backend cupy)
#   demo-log.txt      `gpucredit run` on the example book, 1,000,000 scenarios
#   bench-log.txt     the benchmarks' progress
#   bench-gpu.json    the benchmark's results (rewritten after every case)
#   bench-gpu.md      the same as a markdown table
#   summary.txt       exit status and seconds of every step
# Every step has a hard timeout, most important first; the benchmark gets what is left and
# its own budget drops its least important cases.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TOTAL="${TOTAL:-400}"  # seconds for the whole script
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
step() {  # step NAME SECONDS COMMAND... : run with a hard timeout, record status and time
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then
    echo "$name: not run, only $limit s left" >> "$OUT/summary.txt"
    return 0
  fi
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  echo "$name: exit $rc in $(( SECONDS - t0 )) s (limit $limit s)" >> "$OUT/summary.txt"
  return 0
}
: > "$OUT/summary.txt"
: > "$OUT/pytest-gpu.txt"
: > "$OUT/bench-log.txt"

step environment 60 bash -c '
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  nproc
  "$0" - <<EOF 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "jax", "jaxlib", "cupy", "pyarrow", "pytest", "xdist", "scipy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", e)
import jax
print("jax devices:", jax.devices())
from gpucredit.kernels import cupy_engine
print("cupy available:", cupy_engine.available())
EOF' "$PY" > "$OUT/environment.txt" 2>&1

# 1. issue 4: the tail gradient against the tail forward pass, on the GPU
step gradient 100 "$PY" bench/bench_gradient.py --tail 256 4096 16384 65536 --repeats 5 \
  --store-steps --out "$OUT" >> "$OUT/bench-log.txt" 2>&1

# 2. the JAX engine against the NumPy reference with JAX on the GPU, then the CuPy kernel
step pytest-jax-gpu 110 "$PY" -m pytest -q -p no:cacheprovider -n 8 \
  tests/kernels/test_jax_engine.py tests/portfolio/test_sensitivities.py \
  tests/portfolio/test_engine.py tests/portfolio/test_contributions.py \
  >> "$OUT/pytest-gpu.txt" 2>&1
[ -n "${SKIP_CUPY_TESTS:-}" ] || step pytest-cupy 60 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
  --ignore=tests/kernels/test_cuda_adjoint.py >> "$OUT/pytest-gpu.txt" 2>&1
# issue 19: the CuPy fused adjoint against the JAX gradient, then its cost against the CuPy
# tail forward (target <= 2x), 10,000 tail scenarios x 10,000 loans (their own steps: a slow
# first compile cannot starve the CuPy forward's tests)
[ -n "${SKIP_CUPY_TESTS:-}" ] || step pytest-cupy-adjoint 35 "$PY" -m pytest -m gpu -q -s \
  -p no:cacheprovider tests/kernels/test_cuda_adjoint.py >> "$OUT/pytest-gpu.txt" 2>&1
[ -n "${SKIP_CUPY_TESTS:-}" ] || step gradient-cupy 40 "$PY" bench/bench_gradient.py \
  --backend cupy --loans 10000 --tail 10000 --repeats 1 --out "$OUT" >> "$OUT/bench-log.txt" 2>&1

# 3. the main job on the example book, a million scenarios, end to end
step demo 90 "$PY" -m gpucredit.cli run --scenarios 1000000 --out /tmp/gpucredit-demo \
  > "$OUT/demo-log.txt" 2>&1

# 4. the benchmark: whatever time is left, less a margin for the copy-back
LIMIT=$(( $(left) - 10 ))
step bench "$LIMIT" "$PY" -m gpucredit.benchmark --out "$OUT" --name bench-gpu \
  --budget $(( LIMIT * 2 / 3 )) >> "$OUT/bench-log.txt" 2>&1
echo "total: $(( SECONDS - START )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
ls -la "$OUT"
