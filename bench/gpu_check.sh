#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a GPU, torch and cuda-python but no Rust:
# install the abi3 wheel built elsewhere (`make wheel`, carried in target/wheels/), run the
# tests' CUDA cases (the `cuda` side of each test file's device axis, and tests/cuda),
# compute-sanitizer (memcheck, racecheck) on every kernel, and the GPU halves of the benchmarks.
# Everything it writes goes to ${OUT:-gpu-check}/.
#   usage: OUT=dir bash bench/gpu_check.sh [benchmarks...]   (default: cce w4a16 shiftquant)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-deps --no-index target/wheels/ferrograd-*.whl || exit 1
py="$venv/bin/python"
export FERROGRAD_CACHE_DIR="$out/ptx-cache"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
# The wheel has no `dev` build and there is no Rust here: only the CUDA cases, not the wheel build.
"$py" -m pytest -q -p no:cacheprovider tests -k "cuda and not wheel" \
    > "$out/pytest-cuda.txt" 2>&1 || status=1
tail -3 "$out/pytest-cuda.txt"
for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$py" tests/cuda/sanitize_kernels.py \
        > "$out/sanitizer-$tool.txt" 2>&1 || status=1
    tail -2 "$out/sanitizer-$tool.txt"
done
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(cce w4a16 shiftquant)
for name in "${benches[@]}"; do
    "$py" - "$name" > "$out/bench-$name.txt" 2>&1 <<'PY' || status=1
import importlib, sys
sys.path.insert(0, "bench")
import harness
name = sys.argv[1]
harness.gpu_section(name, None, importlib.import_module(name).gpu)
PY
    cp "bench/results/${name}_gpu.json" "$out/" 2>/dev/null
    tail -2 "$out/bench-$name.txt"
done
exit $status
