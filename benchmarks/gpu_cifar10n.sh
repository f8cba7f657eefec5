#!/usr/bin/env bash
# Issue #13 on a GPU: CE vs DivideMix on the real CIFAR-10 subset (5,551 images) with the real
# CIFAR-10N worst labels, 32 px, at the width the published figures use (PreAct ResNet-18,
# width 64), one seed. On the 2-core CPU only width 8 fits, where CE wins (docs/RESULTS.md).
#
# Before the device call, copy the data into the checkout (git-ignored; shared/ travels):
#   mkdir -p shared/data && cp -r ../shared/data/cifar10-subset ../shared/data/cifar-n shared/data/
# Then run (device tool): bash benchmarks/gpu_cifar10n.sh "$OUT"
#
# Writes into RESULTS_DIR: versions.txt, <method>.txt (the full log, ending with its table row),
# <method>.md (the table), and each run's metrics.csv and summary.json. Each method runs under a
# hard time limit (CIFAR10N_LIMIT seconds, default 270); CIFAR10N_EPOCHS (default 60) epochs.
# Exit status 0 when both methods finished.
#
# CPU dry run of the plumbing (tiny and quick, no install):
#   CIFAR10N_EPOCHS=2 CIFAR10N_WIDTH=2 CIFAR10N_SKIP_INSTALL=1 bash benchmarks/gpu_cifar10n.sh /tmp/g13
set -u
out=${1:?usage: bash benchmarks/gpu_cifar10n.sh RESULTS_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
epochs=${CIFAR10N_EPOCHS:-60}
width=${CIFAR10N_WIDTH:-64}
limit=${CIFAR10N_LIMIT:-270}
runs=${TMPDIR:-/tmp}/cdmix_cifar10n_runs
failed=0

python -c "import torch; print('torch', torch.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" \
    | tee "$out/versions.txt"
[ -z "${CIFAR10N_SKIP_INSTALL:-}" ] && python -m pip install --no-deps --no-build-isolation -q -e . > "$out/install.txt" 2>&1
for method in standard dividemix; do
    rm -rf "$runs/$method"
    timeout --kill-after=10 "$limit" python benchmarks/accuracy_small.py --seeds 1 --only CIFAR --methods "$method" \
        --cifar-width "$width" --cifar-epochs "$epochs" --keep "$runs/$method" --out "$out/$method.md" \
        > "$out/$method.txt" 2>&1 || { failed=1; echo "$method: rc=$? (124: out of time)" | tee -a "$out/versions.txt"; }
    for run in "$runs/$method"/*/; do
        [ -d "$run" ] && cp "$run/metrics.csv" "$out/${method}_metrics.csv" && cp "$run/summary.json" "$out/${method}_summary.json"
    done
    tail -n 3 "$out/$method.txt"
done
exit "$failed"
