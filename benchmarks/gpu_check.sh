#!/usr/bin/env bash
# One call on a bare GPU machine (no network): rebuild the extension, run the test suite on CUDA, run the
# benchmark, print a short table last. Full logs go to $OUT (default ./gpu_out). Budget: under 6 minutes
# (each step has its own timeout so a hang in one still leaves the others' results).
#   bash benchmarks/gpu_check.sh            # everything
#   SKIP_TESTS=1 bash benchmarks/gpu_check.sh   # build + benchmark only
#   ALL_TESTS=1 bash benchmarks/gpu_check.sh    # also the whole suite (CPU-bound parts included; over budget)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "environment -> $OUT/env.log"
{
  nvidia-smi || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  nvcc --version || true
} > "$OUT/env.log" 2>&1
tail -n 3 "$OUT/env.log"

stamp "build: pip install --no-build-isolation --no-deps -e . -> $OUT/build.log"
timeout 150 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_rc=$?
stamp "build rc=$build_rc"
"$PY" -c "import sws_kernels; print(sws_kernels.backends())" >> "$OUT/build.log" 2>&1
tail -n 1 "$OUT/build.log"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  stamp "tests on CUDA -> $OUT/pytest.log"
  # TRITON_INTERPRET must be unset: the Triton kernels compile for the GPU here. The GPU-relevant files run
  # first under their own timeout; the rest of the suite (CPU-bound: gradchecks, training) only with ALL_TESTS=1.
  GPU_TESTS="tests/test_triton_reconstruct.py tests/test_linear.py tests/test_conv.py tests/test_compile.py tests/test_native.py tests/test_native_cuda.py"
  env -u TRITON_INTERPRET timeout 150 "$PY" -m pytest $GPU_TESTS -q -p no:cacheprovider --durations=10 \
    > "$OUT/pytest.log" 2>&1
  tests_rc=$?
  if [ "${ALL_TESTS:-0}" = "1" ]; then
    env -u TRITON_INTERPRET timeout 300 "$PY" -m pytest tests -q -p no:cacheprovider > "$OUT/pytest_all.log" 2>&1
    stamp "full suite rc=$? ($(tail -n 1 "$OUT/pytest_all.log"))"
  fi
  stamp "tests rc=$tests_rc"
fi

stamp "benchmark -> $OUT/gpu_bench.{log,csv}, $OUT/gpu_bench_table.txt"
env -u TRITON_INTERPRET timeout 170 "$PY" benchmarks/gpu_bench.py --out "$OUT" > "$OUT/gpu_bench_stdout.log" 2>&1
bench_rc=$?
stamp "benchmark rc=$bench_rc"

echo
echo "================ gpu_check summary ================"
head -n 1 "$OUT/gpu_bench_stdout.log" 2>/dev/null
echo "build rc=$build_rc  tests rc=$tests_rc  bench rc=$bench_rc  (total $(( $(date +%s) - t0 )) s)"
if [ -f "$OUT/pytest.log" ]; then
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 20
  tail -n 1 "$OUT/pytest.log"
fi
if [ -f "$OUT/gpu_bench_table.txt" ]; then
  cat "$OUT/gpu_bench_table.txt"
else
  tail -n 30 "$OUT/gpu_bench_stdout.log" 2>/dev/null
fi
