#!/usr/bin/env bash
# GPU checks for the speed issues (#5, #11, #22, #23), for a session that has a CUDA machine.
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
#   pretrain_gpu.json/.md   issue #22: SimCLR pretraining (benchmarks/pretrain_speed.py) of PreAct
#                           ResNet-18 width 64 + projection head, 50,000 random CIFAR-shaped images,
#                           batch 1024 (cdmix pretrain's), bf16: GPU name, images/s of a real
#                           SimCLR.train_epoch, of the pure model compute, and with the kNN monitor
#                           (10,000 test images) every 5 epochs; median of up to 3 interleaved repeats
#   hybrid_gpu.json/.md     issue #23: hybrid-stable (the preset's stabilisers, method hybrid, batch 64,
#                           bf16) of PreAct ResNet-18 width 64 (not the preset's WRN-28-2) on 50,000
#                           CIFAR-shaped images (10 colour classes, 40% sym noise), 3 epochs with
#                           --warmup 1 (benchmarks/hybrid_epoch.py): seconds per warm-up and hybrid
#                           epoch, labeled samples, and the report's 120-epoch protocol in GPU hours;
#                           hybrid_gpu_metrics.csv: the run's metrics.csv
#   *.txt                   full stdout/stderr of each step; gpu_check.log: timings and exit codes
#
# Time limits (seconds): install 30, pytest_gpu 45, bench_faithful 160, bench_fast 60,
# bench_cifar100 30, store_gpu 75, pretrain_gpu 70, hybrid_gpu 115: 585 in all, plus a few seconds
# of nvidia-smi and versions. pretrain_gpu starts no repeat after 50 s and hybrid_gpu stops its
# training after 100 s, so both still write their figures (from the repeats / epochs done) in time.
#
# Each step runs under `timeout`; a step that fails or runs out of time is logged and the script
# goes on. Exit status: 0 when every step succeeded, 1 otherwise.
#
# For a dry run of the same steps on a CPU at toy sizes (no install):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_IMAGES=128 GPU_CHECK_WIDTH=2 GPU_CHECK_SKIP_INSTALL=1 \
#   GPU_CHECK_EXTRA="--steps 1 --threads 1 --workers 0 --batch-size 16" bash benchmarks/gpu_check.sh /tmp/gc
# (on a CPU the pretrain_gpu and hybrid_gpu steps run one thread, at GPU_CHECK_IMAGES / GPU_CHECK_WIDTH;
# GPU_CHECK_PRETRAIN_BATCH sets the pretraining batch, default 1024)
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
    step install 30 python -m pip install --no-deps --no-build-isolation -e .
fi
step pytest_gpu 45 python -m pytest -m gpu -q -p no:cacheprovider tests/

# shellcheck disable=SC2206  # EXTRA is a list of flags
BENCH=(python benchmarks/bench.py --model preact_resnet18 --width "$WIDTH" --batch-size 64 --device "$DEVICE"
       --images "$IMAGES" $EXTRA)
step bench_faithful 160 "${BENCH[@]}" --out "$out/bench_faithful.json"
step bench_fast 60 "${BENCH[@]}" --fast --no-reference --profile 25 --out "$out/bench_fast.json"
step bench_cifar100 30 "${BENCH[@]}" --classes 100 --steps 100 --no-reference --out "$out/bench_cifar100.json"
if [ "$DEVICE" = cuda ]; then
    # The JPEGs and the store (1.2 GB) stay on the machine's disk, outside the results folder.
    step store_gpu 75 python benchmarks/store.py --gpu --images "${GPU_CHECK_STORE_IMAGES:-6000}" \
        --work "${TMPDIR:-/tmp}/cdmix_store_bench" --out "$out/store_gpu.json"
fi

# Issue #22: SimCLR pretraining images/s (bf16 on CUDA: pretrain_speed's default there, as cdmix's).
THREADS=()
[ "$DEVICE" = cpu ] && THREADS=(--threads 1)
step pretrain_gpu 70 python benchmarks/pretrain_speed.py --device "$DEVICE" --width "$WIDTH" --images "$IMAGES" \
    --test $(( IMAGES / 5 )) --batch "${GPU_CHECK_PRETRAIN_BATCH:-1024}" --repeats 3 --max-seconds 50 \
    ${THREADS[@]+"${THREADS[@]}"} --json "$out/pretrain_gpu.json" --markdown "$out/pretrain_gpu.md"
# Issue #23: hybrid-stable epoch time, priced for the report's 120 epochs. The npz and the run folder
# stay on the machine's disk, outside the results folder; the run's metrics.csv is copied.
hybrid_work="${TMPDIR:-/tmp}/cdmix_hybrid_epoch"
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
step hybrid_gpu 115 python benchmarks/hybrid_epoch.py --device "$DEVICE" --width "$WIDTH" --images "$IMAGES" \
    --test $(( IMAGES / 5 )) --epochs 3 --warmup 1 --budget 100 --work "$hybrid_work" --out "$out/hybrid_gpu.json"
cp "$hybrid_work/run/metrics.csv" "$out/hybrid_gpu_metrics.csv" 2>/dev/null || true

# Each bench prints its markdown table last; keep it next to the JSON for docs/RESULTS.md.
for name in bench_faithful bench_fast bench_cifar100; do
    if [ -f "$out/$name.txt" ]; then
        sed -n '/^## cdmix bench/,$p' "$out/$name.txt" | grep -v -e '^wrote ' -e '^\[bench\]' > "$out/$name.md"
    fi
done

log "done in $(( $(date +%s) - start ))s, failed=$failed"
exit "$failed"
