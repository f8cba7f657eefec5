#!/usr/bin/env bash
# GPU checks for the speed issue (#5), for a session that has a CUDA machine.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
# Run from anywhere inside the checkout. Installs the package (no dependencies, no network), runs the
# GPU-marked tests and benchmarks/bench.py (`cdmix bench`) with hard time limits (the whole script stays
# under 10 minutes) and writes every table and log into RESULTS_DIR:
#
#   versions.txt            torch / CUDA / GPU name
#   pytest_gpu.txt          pytest -m gpu
#   bench_faithful.md/.json PreAct ResNet-18 (width 64), batch 64, 50,000 random CIFAR-shaped
#                           images, 50% sym noise, faithful preset, with the reference pipeline
#   bench_fast.md/.json     the same with --fast, cdmix only, plus a torch.profiler top-25 table of
#                           one more DivideMix epoch (where the GPU time goes)
#   bench_cifar100.md/.json CIFAR-100 shapes (100 classes), --steps 100, cdmix only: peak memory
#   store_gpu.json/.txt     issue #11: 6,000 generated 500x375 JPEGs in an image store (256 px), one
#                           DivideMix epoch of ResNet-50 at 224 px read from the store (--data-placement
#                           disk): GPU name, images/s, fraction of the epoch spent waiting for data
#   *.txt                   full stdout/stderr of each step; gpu_check.log: timings and exit codes
#
# Each step runs under `timeout`; a step that fails or runs out of time is logged and the script
# goes on. Exit status: 0 when every step succeeded, 1 otherwise.
#
# For a dry run of the same steps on a CPU at toy sizes (no install):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_IMAGES=128 GPU_CHECK_WIDTH=2 GPU_CHECK_SKIP_INSTALL=1 \
#   GPU_CHECK_EXTRA="--steps 1 --threads 1 --workers 0 --batch-size 16" bash benchmarks/gpu_check.sh /tmp/gc
set -u

DEVICE=${GPU_CHECK_DEVICE:-cuda}
IMAGES=${GPU_CHECK_IMAGES:-50000}
WIDTH=${GPU_CHECK_WIDTH:-64}
EXTRA=${GPU_CHECK_EXTRA:-}

out=${1:?usage: bash benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
failed=0

log() {
    echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$out/gpu_check.log"
}

# step NAME LIMIT_SECONDS COMMAND...: run with a hard limit, output into $out/NAME.txt
step() {
    local name=$1 limit=$2
    shift 2
    log "start $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        failed=1
        [ "$rc" -eq 124 ] && log "TIMEOUT $name after ${limit}s"
    fi
    log "end $name rc=$rc"
    tail -n 40 "$out/$name.txt"
    return 0
}

# Import the checkout even if the editable install below fails (no network, old pip).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python - > "$out/versions.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
cat "$out/versions.txt" | tee -a "$out/gpu_check.log"

if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
    step install 40 python -m pip install --no-deps --no-build-isolation -e .
fi
step pytest_gpu 70 python -m pytest -m gpu -q -p no:cacheprovider tests/

# shellcheck disable=SC2206  # EXTRA is a list of flags
BENCH=(python benchmarks/bench.py --model preact_resnet18 --width "$WIDTH" --batch-size 64 --device "$DEVICE"
       --images "$IMAGES" $EXTRA)
step bench_faithful 200 "${BENCH[@]}" --out "$out/bench_faithful.json"
step bench_fast 80 "${BENCH[@]}" --fast --no-reference --profile 25 --out "$out/bench_fast.json"
step bench_cifar100 40 "${BENCH[@]}" --classes 100 --steps 100 --no-reference --out "$out/bench_cifar100.json"
if [ "$DEVICE" = cuda ]; then
    # The JPEGs and the store (1.2 GB) stay on the machine's disk, outside the results folder.
    step store_gpu 110 python benchmarks/store.py --gpu --images "${GPU_CHECK_STORE_IMAGES:-6000}" \
        --work "${TMPDIR:-/tmp}/cdmix_store_bench" --out "$out/store_gpu.json"
fi

# Each bench prints its markdown table last; keep it next to the JSON for docs/RESULTS.md.
for name in bench_faithful bench_fast bench_cifar100; do
    if [ -f "$out/$name.txt" ]; then
        sed -n '/^## cdmix bench/,$p' "$out/$name.txt" | grep -v -e '^wrote ' -e '^\[bench\]' > "$out/$name.md"
    fi
done

log "done in $(( $(date +%s) - start ))s, failed=$failed"
exit "$failed"
