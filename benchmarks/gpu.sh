#!/usr/bin/env bash
# Every GPU figure of the project in one run: the CUDA tests, then each benchmark with
# --device cuda, its table written to benchmarks/results/<name>-cuda.md with the
# machine (in the table) and the commit (appended here) named. Budget: 9 minutes on an
# H100 / H200, so that one device call and a rerun fit; each step's time is printed.
#
# Needs: an NVIDIA GPU and python3 with torch (CUDA), timm, numpy, pytest, hypothesis,
# scikit-learn, faiss-cpu and pytorch-metric-learning. Where the last two are missing
# (the lent GPU machines), carry their cp312 wheels in .whl/ (see the device README's
# recipe): they are installed to /tmp/site. Anything missing ends the run with one line.
#
#   bash benchmarks/gpu.sh                 # tests, losses, launch, eval, recipe, data, archive
#   bash benchmarks/gpu.sh tests eval      # some steps only
#   OUT=DIR COMMIT=abc1234 bash benchmarks/gpu.sh   # copy tables and log to DIR; name
#                                          # the commit where the tree has no .git
#   RESULTS=DIR ...                        # tables to DIR instead of benchmarks/results
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEP_LIMIT=${STEP_LIMIT:-240} # seconds a step may take before it is stopped
BUDGET=540                    # the target: 9 minutes
TOTAL_LIMIT=${TOTAL_LIMIT:-570} # no step runs past this (a device call ends at 600 s)
GRACE=${GRACE:-10}            # then a step that ignores SIGTERM (a hung collective) is killed
die() {
    echo "gpu.sh: $*" >&2
    exit 2
}

if [ -d .whl ] && ! $PY -c "import faiss, pytorch_metric_learning" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >/dev/null 2>&1 || die "the wheels in .whl/ do not install"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
    die "needs $PY with torch and a CUDA GPU (torch: $($PY -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1 | tail -n 1))"
for mod in timm numpy pytest hypothesis sklearn faiss pytorch_metric_learning; do
    $PY -c "import $mod" 2>/dev/null ||
        die "needs the Python package '$mod' (carry its cp312 wheel in .whl/)"
done

COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "an unrecorded commit")}
RESULTS=${RESULTS:-benchmarks/results} # where the tables go
LOG=${OUT:-/tmp}/gpu.log
mkdir -p "${OUT:-/tmp}"
: >"$LOG"
steps=${*:-tests losses launch eval recipe data archive}
for step in $steps; do
    [ "$step" = tests ] || [ -f "benchmarks/bench_$step.py" ] || die "no step named '$step'"
done
mkdir -p "$RESULTS"
start=$(date +%s)
status=0

for step in $steps; do
    t0=$(date +%s)
    left=$((start + TOTAL_LIMIT - t0))
    limit=$((left < STEP_LIMIT ? left : STEP_LIMIT))
    if [ $limit -lt 10 ]; then
        echo "gpu.sh: $step: not run, out of time ($TOTAL_LIMIT s in all)" | tee -a "$LOG"
        status=1
        continue
    fi
    if [ "$step" = tests ]; then
        timeout -k "$GRACE" "$limit" $PY -m pytest -m cuda -q -p no:cacheprovider tests >>"$LOG" 2>&1
        rc=$?
        summary=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)\b.* in [0-9.]+s" "$LOG" | tail -n 1)
        {
            echo "# CUDA tests"
            echo
            echo "Machine: $($PY -c 'from benchmarks.common import machine; print(machine())')."
            echo "Command: \`python -m pytest -m cuda tests\` (benchmarks/gpu.sh), exit $rc."
            echo
            echo "Result: ${summary:-no summary line (see the log)}"
            grep -E "^(FAILED|ERROR) " "$LOG" | sed 's/^/- /'
            echo
            echo "Run at commit $COMMIT by benchmarks/gpu.sh."
        } >"$RESULTS/tests-cuda.md"
    else
        timeout -k "$GRACE" "$limit" $PY -m "benchmarks.bench_$step" --device cuda \
            --out "$RESULTS/$step-cuda.md" >>"$LOG" 2>&1
        rc=$?
        [ $rc -eq 0 ] && printf '\nRun at commit %s by benchmarks/gpu.sh.\n' "$COMMIT" >>"$RESULTS/$step-cuda.md"
    fi
    [ $rc -eq 0 ] || status=1
    echo "gpu.sh: $step: exit $rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
done

total=$(($(date +%s) - start))
echo "gpu.sh: all steps in $total s (budget $BUDGET s)$([ $total -gt $BUDGET ] && echo ': OVER BUDGET')" | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*-cuda.md "$OUT"/ 2>/dev/null
fi
exit $status
