#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a GPU, torch and cuda-python but no Rust:
# install the abi3 wheel built elsewhere (`make wheel`, carried in target/wheels/; peers' wheels
# for the benchmarks may ride along in .whl/), then
#   A. at once: the tests' CUDA cases (the `cuda` side of each test file's device axis, and
#      tests/cuda, the demo on the GPU among them) and compute-sanitizer (memcheck, racecheck)
#      over one launch of every kernel (tests/cuda/sanitize_kernels.py);
#   B. one after another, alone on the GPU: the GPU halves of the benchmarks, the host's cost
#      per call and Nsight Compute's view of each kernel (bench/gpu_profile.py).
# Each stage has its own time limit. TESTS (default: tests) narrows the test files, PROFILE=0
# skips the profiles. Everything lands in one tarball, ${OUT:-gpu-check}/gpu-check.tgz
# (logs, bench/results/*_gpu.json), with summary.txt beside it.
#   usage: OUT=dir bash bench/gpu_check.sh [benchmarks...]   (default: cce w4a16 shiftquant)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
tmp=$(mktemp -d)
work=$tmp/gpu-check
mkdir -p "$out" "$work"
summary=$out/summary.txt
log() { echo "$*" | tee -a "$summary"; }

peers=()
[ -d .whl ] && peers=(.whl/*.whl)
python3 -m pip install -q --no-deps --no-index --no-compile --target "$tmp/site" \
    target/wheels/ferrograd-*.whl "${peers[@]}" > "$work/install.txt" 2>&1 \
    || { cat "$work/install.txt"; exit 1; }
export PYTHONPATH=$tmp/site${PYTHONPATH:+:$PYTHONPATH}
export FERROGRAD_CACHE_DIR=$tmp/ptx-cache PYTHONUNBUFFERED=1
{
    nvidia-smi
    python3 -c "import torch, ferrograd; print('torch', torch.__version__, torch.version.cuda,
torch.cuda.get_device_name()); print('ferrograd', ferrograd.__file__)"
    python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|cuda|transformers|liger|cut)"
} > "$work/machine.txt" 2>&1
tail -6 "$work/machine.txt" | tee -a "$summary"
status=0
pack() { tar -czf "$out/gpu-check.tgz" -C "$tmp" gpu-check; }  # after each stage: a run cut
# short by its caller's limit still brings back what it finished
stage() {  # stage NAME SECONDS CMD...: runs CMD under a limit into NAME.txt, logs its end
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" > "$work/$name.txt" 2>&1
    rc=$?
    log "== $name: rc=$rc in $((SECONDS - start)) s (limit $limit)"
    tail -4 "$work/$name.txt" | tee -a "$summary"
    return $rc
}

# A. Correctness, in parallel (the sanitizers' launches are small).
timeout_opt=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 120)
xdist_opt=()
python3 -c "import xdist" 2>/dev/null && xdist_opt=(-n 4)
stage pytest-cuda 180 python3 -m pytest -q -p no:cacheprovider "${xdist_opt[@]}" \
    "${timeout_opt[@]}" -rfE ${TESTS:-tests} -k "cuda and not wheel" &
pids=($!)
for tool in memcheck racecheck; do
    # --report-api-errors no: cuda-python asks the driver for every entry point it knows, and
    # each one this driver lacks is an API error (34 with driver 580), none of them ferrograd's.
    stage "sanitizer-$tool" 180 compute-sanitizer --tool "$tool" --report-api-errors no \
        --error-exitcode 1 python3 tests/cuda/sanitize_kernels.py &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
pack

# B. Benchmarks, alone on the GPU.
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(cce w4a16 shiftquant)
for name in "${benches[@]}"; do
    stage "bench-$name" "${BENCH_LIMIT:-100}" python3 - "$name" <<'PY' || status=1
import importlib, sys
sys.path.insert(0, "bench")
import harness
name = sys.argv[1]
harness.gpu_section(name, None, importlib.import_module(name).gpu)
PY
    cp "bench/results/${name}_gpu.json" "$work/" 2>/dev/null
    pack
done
if [ "${PROFILE:-1}" = 1 ]; then
    stage profile-host 60 python3 bench/gpu_profile.py host || status=1
    stage ncu 150 ncu --clock-control none --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats -k "regex:w4a16_gemm|cce_|sq_gemm" \
        python3 bench/gpu_profile.py kernels || status=1
    pack
fi
log "== status $status"
pack
exit $status
