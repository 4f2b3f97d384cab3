#!/usr/bin/env bash
# The GPU check of assignbench: one script, at most 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run      # every section on the CPU, tiny sizes (also GPU_CHECK_DEVICE=cpu)
#   bash benchmarks/gpu_check.sh --fetch-wheels # where pip reaches PyPI: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh --grid-only    # environment, data and the grid only (a longer-budget grid)
#
# Sections, each timed and capped: environment, digits data, the assigner tests (tests/assigners, whose
# CUDA tests run when CUDA is there), the assignment benchmark, the training-throughput benchmark, and
# the `demo` grid (iou+none, atss+centerness, paa+iou) on the gpu_digits schedule shortened to
# GPU_CHECK_ITERS iterations, ending with its table and AP and images/s per variant.
#
# Environment: the GPU image has torch but not hydra-core, omegaconf, antlr4, pycocotools or
# faster-coco-eval, and no network. Unless .venv or python3 already has them, the script installs them
# next to the preinstalled torch (pip --target $WORK/site, on PYTHONPATH) from the wheels in .whl/
# (made by --fetch-wheels; carry .whl to the machine), or from PyPI when there is no .whl/. The repo
# itself is used in place (PYTHONPATH), so `python -m experiments.train` stands for assignbench-train.
#
# Output: the full log, a summary, the benchmarks' CSVs, the grid's table and <grid>_results.tgz (its run
# files and report, without checkpoints) go to $OUT when it is set (else to $WORK); runs, data and
# installed packages go to $WORK (default /tmp/assignbench-gpu-check), as the device tool returns only
# a few files from $OUT.
# Variables: OUT, GPU_CHECK_DEVICE (cuda|cpu), GPU_CHECK_ITERS (default 250), GPU_CHECK_WORK,
# GPU_CHECK_PYTHON (an interpreter to try first), GPU_CHECK_GRID (default demo), GPU_CHECK_VARIANTS (a
# subset of the grid's variants, e.g. [paa_none,paa_iou]; default all), GPU_CHECK_JOBS (grid
# variants trained at once on the one GPU through Hydra's joblib launcher; default 1, one after the
# other), GPU_CHECK_GRID_CAP (seconds, default 200) and GPU_CHECK_CURVE (default [1.0]: the fractions
# of training evaluated for ap_curve).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
GRID_ONLY=0
[[ ${GPU_CHECK_DEVICE:-cuda} == cpu ]] && MODE=dry
for arg in "$@"; do
    case $arg in
        --dry-run) MODE=dry ;;
        --fetch-wheels) MODE=fetch ;;
        --grid-only) GRID_ONLY=1 ;;
        -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# Shared with gpu_reference.sh: WHEEL_PINS, fetch_wheels, section, has_packages, setup_python.
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

if [[ $MODE == fetch ]]; then
    fetch_wheels
    exit 0
fi

WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/assignbench-gpu-check}
[[ $MODE == dry ]] && WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/assignbench-gpu-dry.XXXXXX")}
open_report gpu_check.log
GRID=${GPU_CHECK_GRID:-demo}
JOBS=${GPU_CHECK_JOBS:-1}
FAILED=0
NEEDED_MODULES="import torch, torchvision, sklearn, hydra, omegaconf, pycocotools, faster_coco_eval, pytest"
GRID_ARGS=()
[[ -n ${GPU_CHECK_VARIANTS:-} ]] && GRID_ARGS+=("grid.variants=$GPU_CHECK_VARIANTS")
if [[ $JOBS -gt 1 ]]; then
    NEEDED_MODULES+=", hydra_plugins.hydra_joblib_launcher"
    GRID_ARGS+=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi
[[ $MODE == gpu ]] && NEEDED_MODULES+="; assert torch.cuda.is_available(), 'this torch sees no CUDA device'"

print_grid() {
    "$PY" - "$RESULTS/$GRID" "$REPORT" <<'EOF'
import json, shutil, sys
from pathlib import Path
grid, report = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for metrics_file in sorted(grid.glob("*/metrics.json")):
    m = json.loads(metrics_file.read_text())
    rows.append(f"{metrics_file.parent.name:<24} {m['status']:<7} AP {m.get('AP') or 0:5.1f}  AP50 {m.get('AP50') or 0:5.1f}  "
                f"{m.get('images_per_second') or 0:8.1f} img/s  {m.get('peak_memory_mb') or 0:8.0f} MiB  {m.get('error') or ''}")
print("\n".join(rows) or "no runs")
table = grid / "table.md"
if table.exists():
    print(table.read_text())
    shutil.copy(table, report / f"{grid.name}_table.md")
(report / f"{grid.name}_runs.txt").write_text("\n".join(rows) + "\n")
sys.exit(0 if rows and all(" done " in r for r in rows) else 1)
EOF
}

make_data() {  # the default digits set (benchmarks) and the demo grid's 256 px one, on every core
    [[ $GRID_ONLY == 1 ]] || "$PY" -m experiments.data_cli digits --num-workers "$(nproc)"
    "$PY" -m experiments.data_cli digits --image-size 256 --num-train 2000 --num-val 200 --num-workers "$(nproc)"
}

copy_csvs() {
    cp "$WORK"/bench/*.csv "$REPORT"/ 2>/dev/null || true
}

echo "assignbench GPU check: mode $MODE, work $WORK, report $REPORT, grid $GRID ${GRID_ARGS[*]:-}, $(date -u +%FT%TZ)"
PY=
section env 0 setup_python
[[ -n $PY ]] || { echo "no Python environment with the needed packages; stopping"; exit 1; }

if [[ $MODE == gpu ]]; then
    DEVICE=cuda
    ITERS=${GPU_CHECK_ITERS:-250}
    GRID_DATA=(data.digits.num_train=2000 data.digits.num_val=200)
    section data 0 make_data
    if [[ $GRID_ONLY == 0 ]]; then
        section tests 100 "$PY" -m pytest tests/assigners tests/detector/test_losses.py::test_the_loss_reads_the_device_once_on_cuda -q -p no:cacheprovider
        section assign 60 "$PY" -m benchmarks.assign --device cuda --out-dir "$WORK/bench"
        section train 60 "$PY" -m benchmarks.train --device cuda --out-dir "$WORK/bench"
    fi
    section grid "${GPU_CHECK_GRID_CAP:-200}" "$PY" -m experiments.train -m "grid=$GRID" device=cuda \
        schedule=gpu_digits "schedule.iters=$ITERS" schedule.warmup_iters=50 schedule.log_every=50 \
        "${GRID_DATA[@]}" "eval.curve_fractions=${GPU_CHECK_CURVE:-[1.0]}" eval.snapshots=false \
        progress=false "results_root=$RESULTS" "${GRID_ARGS[@]}"
else
    DEVICE=cpu
    TINY=(schedule=debug schedule.iters=2 model.fpn_channels=32 model.num_convs=1 data.digits.image_size=96
        data.digits.num_train=16 data.digits.num_val=4 data.num_workers=0 'eval.curve_fractions=[1.0]'
        eval.snapshots=false progress=false)
    # CPU caps are generous: a shared 2-core machine ran the train section past 60 s and the grid (now with
    # its error analyses, detections and report.html) past 120 s while a training ran beside it.
    if [[ $GRID_ONLY == 0 ]]; then
        section tests 120 "$PY" -m pytest tests/assigners tests/detector/test_losses.py -q -p no:cacheprovider -k cuda
        section assign 120 "$PY" -m benchmarks.assign --device cpu --tiny --reps 1 --warmup 0 --out-dir "$WORK/bench"
        section train 120 "$PY" -m benchmarks.train --device cpu --tiny --reps 1 --warmup 0 --out-dir "$WORK/bench"
    fi
    section grid 300 "$PY" -m experiments.train -m "grid=$GRID" device=cpu num_threads=1 "${TINY[@]}" \
        "results_root=$RESULTS" "${GRID_ARGS[@]}"
fi
copy_csvs
# The grid's runs (configs, metrics.json, stats.csv, assignment snapshots) and its report, in one file:
# the device tool brings back only a few files from $OUT.
[[ -d $RESULTS/$GRID ]] && tar -czf "$REPORT/${GRID}_results.tgz" -C "$RESULTS" --exclude checkpoints \
    --exclude detections.json --exclude '*.lock' "$GRID"
section table 0 print_grid

echo
echo "=== summary ($DEVICE) ==="
cat "$SUMMARY"
exit $FAILED
