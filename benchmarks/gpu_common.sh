# Shell functions shared by benchmarks/gpu_check.sh and benchmarks/gpu_reference.sh (sourced, not run).
# The caller sets REPO, WORK, NEEDED_MODULES and FAILED, and runs from the repository root.

# Versions the GPU machine gets: those of the local .venv when there is one, else these.
WHEEL_PINS=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 pycocotools==2.0.11 faster-coco-eval==1.8.0)

fetch_wheels() {
    local py=python3 pins=()
    [[ -x .venv/bin/python ]] && py=.venv/bin/python
    for pin in "${WHEEL_PINS[@]}"; do
        local name=${pin%%==*} version
        version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
            || version=${pin##*==}
        pins+=("$name==$version")
    done
    mkdir -p .whl
    local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # Compiled ones for the GPU image's CPython 3.12 on x86-64; the rest are pure Python.
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${pins[3]}" "${pins[4]}"
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[0]}" "${pins[1]}"
    "$py" -m pip wheel -q --no-deps -w .whl "${pins[2]}"  # published as a source distribution only
    ls -l .whl
    echo "carry .whl to the GPU machine (run's carry: [\".whl\"])"
}

# section NAME CAP_SECONDS COMMAND...: run, time and record one section; a failure does not stop the
# others. A command is stopped after CAP_SECONDS; a shell function of this script runs uncapped.
section() {
    local name=$1 cap=$2 start status
    shift 2
    echo
    start=$(date +%s)
    set +e
    if declare -F "$1" >/dev/null; then
        echo "=== $name ==="
        "$@"
    else
        echo "=== $name (stopped after ${cap}s) ==="
        timeout "$cap" "$@"
    fi
    status=$?
    set -e
    local seconds=$(($(date +%s) - start))
    local verdict=ok
    if [[ $status -eq 124 ]]; then verdict="TIMED OUT"; elif [[ $status -ne 0 ]]; then verdict="FAILED ($status)"; fi
    [[ $verdict == ok ]] || FAILED=1
    printf '%-12s %5ss  %s\n' "$name" "$seconds" "$verdict" | tee -a "$SUMMARY"
}

# has_packages PYTHON: whether PYTHON imports everything the check needs (and, on the GPU, sees CUDA).
has_packages() {
    "$1" -c "$NEEDED_MODULES; import sys; print(sys.executable, sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null
}

# The first interpreter with every package; else python3 with the missing ones installed into $WORK/site
# (no venv: the image's python3 is itself a venv, and a venv made from it would not see its torch).
setup_python() {
    local site=$WORK/site candidate
    for candidate in ${GPU_CHECK_PYTHON:-} "$REPO/.venv/bin/python" "$(command -v python3)"; do
        if [[ -x $candidate ]] && has_packages "$candidate"; then
            PY=$candidate
            return 0
        fi
    done
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --upgrade --no-deps --no-compile --no-index --target "$site" .whl/*.whl || return 1
    else
        python3 -m pip install -q --upgrade --no-deps --no-compile --target "$site" "${WHEEL_PINS[@]}" || return 1
    fi
    export PYTHONPATH=$PYTHONPATH:$site
    has_packages python3 && PY=$(command -v python3)
}

# open_report LOG_NAME: the report folder REPORT ($OUT, else $WORK) with LOG_NAME and summary.txt (SUMMARY),
# all later output teed into the log, and the environment the sections run in (RESULTS under $WORK).
open_report() {
    REPORT=${OUT:-$WORK}
    mkdir -p "$WORK" "$REPORT"
    LOG=$REPORT/$1
    SUMMARY=$REPORT/summary.txt
    : >"$LOG"
    : >"$SUMMARY"
    exec > >(tee -a "$LOG") 2>&1
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1
    export ASSIGNBENCH_DATA=$WORK/data
    RESULTS=$WORK/results
}
