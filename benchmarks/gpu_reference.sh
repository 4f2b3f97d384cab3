#!/usr/bin/env bash
# The GPU reference grids of assignbench (issue 12, point 4), in one call that fits a short GPU slot.
#
#   bash benchmarks/gpu_reference.sh              # on the GPU machine: the grids, in order, until the budget is spent
#   bash benchmarks/gpu_reference.sh --converge   # the regime's convergence check: demo at N and at 2N iterations
#   bash benchmarks/gpu_reference.sh --dry-run    # either of the above on the CPU at tiny sizes (or GPU_CHECK_DEVICE=cpu)
#
# Grids: GPU_REFERENCE_GRIDS (default "table1_modules table1_separation table1_fnp_fsr table4_topk_scale"), on
# the gpu_reference schedule (digits 256 px, batch 32, 6000 train / 500 val images, train images resident on
# the GPU, host synchronised on logged iterations only), seeds GPU_REFERENCE_SEEDS (default [0,1,2]),
# GPU_CHECK_JOBS runs at once on the one GPU (default 7) through Hydra's joblib launcher.
# Resuming across GPU slots: the runs already done in GPU_REFERENCE_PRIOR (default results/reference/gpu, the
# committed ones) are copied in first and skipped, so each slot goes on where the last one stopped. All grids
# together get GPU_REFERENCE_BUDGET seconds (default 540); a grid is stopped when the budget runs out, and its
# finished runs still come back. Runs stopped mid-way come back as interrupted and train again next time.
# --converge trains the demo grid (seeds GPU_REFERENCE_SEEDS) for GPU_REFERENCE_ITERS (default 1500) and for
# twice that, then prints benchmarks/convergence.py's verdict on the criteria fixed in advance.
# Output ($OUT, else $WORK): gpu_reference.log, summary.txt and one <grid>_results.tgz per grid (run files
# without checkpoints, and the grid's report). To land them: tar -xzf <grid>_results.tgz -C results/reference/gpu
# Other variables: GPU_CHECK_WORK, GPU_CHECK_PYTHON, GPU_REFERENCE_VARIANTS (a subset, e.g. [paa_iou,atss_iou]).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
CONVERGE=0
[[ ${GPU_CHECK_DEVICE:-cuda} == cpu ]] && MODE=dry
for arg in "$@"; do
    case $arg in
        --dry-run) MODE=dry ;;
        --converge) CONVERGE=1 ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/assignbench-gpu-reference}
open_report gpu_reference.log
PRIOR=${GPU_REFERENCE_PRIOR:-$REPO/results/reference/gpu}
GRIDS=${GPU_REFERENCE_GRIDS:-table1_modules table1_separation table1_fnp_fsr table4_topk_scale}
SEEDS=${GPU_REFERENCE_SEEDS:-[0,1,2]}
ITERS=${GPU_REFERENCE_ITERS:-1500}
JOBS=${GPU_CHECK_JOBS:-7}
DEADLINE=$(($(date +%s) + ${GPU_REFERENCE_BUDGET:-540}))
FAILED=0
NEEDED_MODULES="import torch, torchvision, sklearn, hydra, omegaconf, pycocotools, faster_coco_eval, pandas, seaborn"
NEEDED_MODULES+=", hydra_plugins.hydra_joblib_launcher"
[[ $MODE == gpu ]] && NEEDED_MODULES+="; assert torch.cuda.is_available(), 'this torch sees no CUDA device'"

if [[ $MODE == gpu ]]; then
    RUN_ARGS=(device=cuda schedule=gpu_reference)
    DATA_ARGS=(--image-size 256 --num-workers "$(nproc)")
else  # the same path (resident data, joblib launcher, resume, report) at sizes a CPU does in seconds
    RUN_ARGS=(device=cpu num_threads=1 schedule=gpu_reference schedule.log_every=1 schedule.warmup_iters=1
        schedule.batch_size=4
        model.fpn_channels=32 model.num_convs=1 data.digits.image_size=96 data.digits.num_train=16
        data.digits.num_val=4 data.num_workers=0 schedule.min_size=96 schedule.test_min_size=96 schedule.max_size=96)
    DATA_ARGS=(--image-size 96 --num-train 16 --num-val 4)
    [[ -n ${GPU_REFERENCE_ITERS:-} ]] || ITERS=2
fi
RUN_ARGS+=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" "seeds=$SEEDS" progress=false eval.snapshots=false
    "eval.curve_fractions=[0.5,0.75,1.0]")
[[ -n ${GPU_REFERENCE_VARIANTS:-} ]] && RUN_ARGS+=("grid.variants=$GPU_REFERENCE_VARIANTS")

# train_grid GRID ROOT ITERS: the grid's missing runs into ROOT, stopped at the deadline.
train_grid() {
    local grid=$1 root=$2 iters=$3 left=$((DEADLINE - $(date +%s)))
    if [[ $left -lt 30 ]]; then
        echo "=== $grid: skipped, ${left}s of the budget left ===" | tee -a "$SUMMARY"
        return 0
    fi
    # Each run checkpoints and stops after its first step past the deadline (config `deadline`), later runs
    # skip; the timeout, a minute later, is only the safety net.
    section "$grid" "$((left + 60))" "$PY" -m experiments.train -m "grid=$grid" "${RUN_ARGS[@]}" \
        "schedule.iters=$iters" "results_root=$root" "deadline=$DEADLINE"
    # A grid stopped by the deadline has no report yet: write it from the runs that finished.
    [[ -d $root/$grid ]] && "$PY" -m analysis.report "$root/$grid" >/dev/null 2>&1 || true
}

# pack GRID ROOT NAME: the grid's run files and report into $REPORT/NAME_results.tgz.
pack() {
    [[ -d $2/$1 ]] || return 0
    tar -czf "$REPORT/$3_results.tgz" -C "$2" --exclude checkpoints --exclude '*.lock' "$1"
    "$PY" - "$2/$1" <<'EOF'
import json, sys
from pathlib import Path
for metrics_file in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(metrics_file.read_text())
    print(f"{metrics_file.parent.name:<28} {m['status']:<11} AP {m.get('AP') or 0:5.1f}  iters {m.get('iters') or 0:>5}  "
          f"{m.get('images_per_second') or 0:7.1f} img/s  {m.get('train_seconds') or 0:6.0f} s  {m.get('error') or ''}")
EOF
}

echo "assignbench GPU reference: mode $MODE, work $WORK, report $REPORT, jobs $JOBS, $(date -u +%FT%TZ)"
PY=
section env 0 setup_python
[[ -n $PY ]] || { echo "no Python environment with the needed packages; stopping"; exit 1; }
section data 0 "$PY" -m experiments.data_cli digits "${DATA_ARGS[@]}"
[[ $MODE == gpu ]] && "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name())" | tee -a "$SUMMARY"
# PAA's default gmm_backend "auto" is the fused Triton EM on CUDA: its exactness on this GPU first, so that a
# kernel failure is named in the summary before PAA runs fail on it.
[[ $MODE == gpu ]] && section triton_em 120 "$PY" -m pytest tests/assigners/test_gmm_triton.py -q -p no:cacheprovider -k cuda

if [[ $CONVERGE == 1 ]]; then
    for iters in "$ITERS" "$((2 * ITERS))"; do
        train_grid demo "$RESULTS/converge/$iters" "$iters"
        pack demo "$RESULTS/converge/$iters" "demo_${iters}"
    done
    set +e
    "$PY" -m benchmarks.convergence "$RESULTS/converge/$ITERS/demo" "$RESULTS/converge/$((2 * ITERS))/demo" \
        | tee "$REPORT/convergence.txt"
    set -e
else
    mkdir -p "$RESULTS"
    for grid in $GRIDS; do
        if [[ -d $PRIOR/$grid ]]; then  # earlier slots' finished runs: skipped by the grid runner
            mkdir -p "$RESULTS/$grid"
            for run in "$PRIOR/$grid"/*/; do
                grep -q '"status": "done"' "$run/metrics.json" 2>/dev/null && cp -r "$run" "$RESULTS/$grid/"
            done
        fi
        train_grid "$grid" "$RESULTS" "$ITERS"
        pack "$grid" "$RESULTS" "$grid"
    done
fi

echo
echo "=== summary ($MODE) ==="
cat "$SUMMARY"
exit $FAILED
