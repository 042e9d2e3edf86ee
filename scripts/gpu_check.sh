#!/usr/bin/env bash
# gpu_check.sh: every model on a GPU, one timed script (issue "Every model near its sparse-kernel
# floor", item 6). For a machine with a GPU and no network that holds a copy of this repo and
# nothing installed for it:
#
#   1. makes a venv (seeing the machine's own packages), tries `pip install torch==2.13.0` (the
#      pinned version; from the default index, falling back to whatever torch is there), then
#      `pip install -e .` (falling back to --no-deps --no-build-isolation, then to PYTHONPATH=src),
#      and prints the torch it got and whether torch.cuda.is_available();
#   2. trains one epoch of every model with --device cuda (copf and pkef on hkuds-beibei, the
#      others on crgcn-beibei; configs/<model>/<dataset>.yaml, or the model's defaults where there
#      is none), evaluation kept to the one at the end (train.eval_start=1, no test at every
#      evaluation);
#   3. runs `mbrec bench MODEL DATA --config F --steps 20 --device cuda` for every model (reported
#      as missing, and skipped, where this version has no `mbrec bench`).
#
# Every command runs under `timeout`, inside a total budget (default 540 s, so the whole script
# ends within 10 minutes); a failing model does not stop the others. The results table is
# printed at the end and written, with each command's output, to $OUT/gpu_check.md and
# $OUT/gpu_check.log ($OUT unset: the folder the script was started from), rewritten after every
# command so a killed run still leaves what it did.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--no-install] [--device cuda] [--models a,b]
#                                  [--dataset NAME] [--steps 20] [--budget 540] [--data-archive F]
#   --dry-run     print the commands only (no venv, no install, nothing run)
#   --no-install  use $PYTHON (default python3) as it is, mbrec from src/ if not installed
#   --dataset     one dataset for every model (e.g. synthetic, for a quick check on a CPU)
#   --data-archive  a .tar.gz of dataset folders (the datasets do not travel with the repo):
#                 unpacked to a temporary folder that becomes MBREC_DATASETS
# Environment: MBREC_DATASETS (else shared/datasets in the repo, else ../shared/datasets),
#   PYTHON, GPU_CHECK_VENV (default /tmp/mbrec-gpu-venv), OUT.

set -u

ALL_MODELS=(lightgcn rmbrec copf bigel mbcgcn crgcn pkef)
TORCH_PIN="torch==2.13.0"

START_DIR=$(pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPORT_DIR=${OUT:-$START_DIR}
PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-/tmp/mbrec-gpu-venv}

DRY_RUN=0
INSTALL=1
DEVICE=cuda
MODELS_ARG=""
DATASET_ARG=""
STEPS=20
BUDGET=540
DATA_ARCHIVE=${GPU_CHECK_DATA_ARCHIVE:-}

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    --device) DEVICE=${2:?--device needs a value}; shift ;;
    --models) MODELS_ARG=${2:?--models needs a value}; shift ;;
    --dataset) DATASET_ARG=${2:?--dataset needs a value}; shift ;;
    --steps) STEPS=${2:?--steps needs a value}; shift ;;
    --budget) BUDGET=${2:?--budget needs a value}; shift ;;
    --data-archive) DATA_ARCHIVE=${2:?--data-archive needs a value}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$STEPS$BUDGET" in *[!0-9]*) echo "gpu_check.sh: --steps and --budget take whole numbers" >&2; exit 2 ;; esac

if [ -n "$MODELS_ARG" ]; then
  IFS=',' read -r -a MODELS <<< "$MODELS_ARG"
else
  MODELS=("${ALL_MODELS[@]}")
fi

dataset_for() {  # the Beibei copy each model's paper numbers use
  if [ -n "$DATASET_ARG" ]; then echo "$DATASET_ARG"; return; fi
  case "$1" in
    copf|pkef) echo hkuds-beibei ;;
    *) echo crgcn-beibei ;;
  esac
}

config_for() {  # configs/<model>/<dataset>.yaml, or nothing (model defaults)
  local f="configs/$1/$2.yaml"
  if [ -f "$REPO/$f" ]; then echo "$f"; fi
}

# ---------------------------------------------------------------- report (markdown + log)
mkdir -p "$REPORT_DIR" 2>/dev/null || REPORT_DIR=$START_DIR
REPORT="$REPORT_DIR/gpu_check.md"
LOG="$REPORT_DIR/gpu_check.log"
T0=$(date +%s)
ROWS=()
NOTES=()
BENCH_OUT=""

elapsed() { echo $(( $(date +%s) - T0 )); }

write_report() {
  {
    echo "# GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname 2>/dev/null || echo '?'), $(elapsed) s in all" \
         "(budget $BUDGET s), device $DEVICE, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    local n
    for n in "${NOTES[@]+"${NOTES[@]}"}"; do echo "- $n"; done
    echo
    echo "| model | dataset | command | status | wall s | result |"
    echo "|---|---|---|---|---|---|"
    local r
    for r in "${ROWS[@]+"${ROWS[@]}"}"; do echo "$r"; done
    if [ -n "$BENCH_OUT" ]; then
      echo
      echo "## mbrec bench output"
      printf '%s' "$BENCH_OUT"
    fi
    echo
    echo "Each command's output: gpu_check.log."
  } > "$REPORT"
}

note() { echo "gpu_check: $*"; NOTES+=("$*"); write_report; }

# run_timed CAP NAME CMD...: runs CMD under timeout (CAP, or what is left of the budget), output
# to $CMD_OUT (and the log); sets RC (124: timed out, 125: skipped, budget spent) and WALL.
run_timed() {
  local cap=$1 name=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - 5 ))
  local limit=$(( cap < left ? cap : left ))
  CMD_OUT="$WORK/$name.out"
  LIMIT=$limit
  : > "$CMD_OUT"
  if [ "$limit" -lt 10 ]; then
    RC=125; WALL=0
    echo "== $name: skipped, time budget spent" >> "$LOG"
    return
  fi
  echo "== $name (timeout ${limit}s): $*" >> "$LOG"
  local t
  t=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$CMD_OUT" 2>&1
  RC=$?
  WALL=$(( $(date +%s) - t ))
  cat "$CMD_OUT" >> "$LOG"
  echo "== $name: rc $RC, ${WALL}s" >> "$LOG"
}

status_of() {  # RC -> ok / failed / timeout / skipped
  case "$RC" in
    0) echo ok ;;
    124|137) echo "timeout (${LIMIT}s)" ;;
    125) echo "skipped (budget spent)" ;;
    *) echo "failed (rc $RC)" ;;
  esac
}

last_error() {  # the last meaningful line of a failed command's output, made table-safe
  grep -v '^\s*$' "$CMD_OUT" | grep -iv 'warning' | tail -n 1 | cut -c1-200 | tr '|' '/'
}

quote() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

# ---------------------------------------------------------------- the commands
train_cmd() {  # train_cmd MODEL DATA CONFIG OUTDIR
  local cmd=("${MBREC[@]}" train "$1" "$2")
  if [ -n "$3" ]; then cmd+=(--config "$3"); fi
  cmd+=(--device "$DEVICE" --set train.epochs=1 --set train.eval_start=1 --set train.test_every_eval=false
        --set train.progress=false --out "$4" --json)
  TRAIN_CMD=("${cmd[@]}")
}

bench_cmd() {  # bench_cmd MODEL DATA CONFIG
  local cmd=("${MBREC[@]}" bench "$1" "$2")
  if [ -n "$3" ]; then cmd+=(--config "$3"); fi
  cmd+=(--steps "$STEPS" --device "$DEVICE")
  BENCH_CMD=("${cmd[@]}")
}

find_datasets() {
  if [ -n "$DATA_ARCHIVE" ]; then
    if [ "$DRY_RUN" = 1 ]; then
      printf '%s\n' "$(quote tar -xzf "$DATA_ARCHIVE" -C "$WORK/datasets")"
    else
      mkdir -p "$WORK/datasets"
      run_timed 120 unpack-datasets tar -xzf "$DATA_ARCHIVE" -C "$WORK/datasets"
      [ "$RC" = 0 ] || note "could not unpack $DATA_ARCHIVE: $(status_of) ($(last_error))"
    fi
    MBREC_DATASETS="$WORK/datasets"; export MBREC_DATASETS
    return
  fi
  if [ -n "${MBREC_DATASETS:-}" ]; then return; fi
  local d
  for d in "$REPO/shared/datasets" "$REPO/../shared/datasets" "$START_DIR/../shared/datasets"; do
    if [ -d "$d" ]; then MBREC_DATASETS=$(cd "$d" && pwd); export MBREC_DATASETS; return; fi
  done
}

if [ "$DRY_RUN" = 1 ]; then
  WORK=${TMPDIR:-/tmp}/gpu_check
  case "$DATA_ARCHIVE" in /*|"") ;; *) DATA_ARCHIVE="$START_DIR/$DATA_ARCHIVE" ;; esac
  find_datasets
  if [ "$INSTALL" = 1 ]; then
    PY="$VENV/bin/python"
    echo "# setup"
    printf '%s\n' "$(quote "$PYTHON" -m venv --system-site-packages "$VENV")"
    printf '%s\n' "$(quote "$PY" -m pip install "$TORCH_PIN")  # falls back to the torch already there"
    printf '%s\n' "$(quote "$PY" -m pip install -e "$REPO")  # falls back to --no-deps --no-build-isolation, then PYTHONPATH=src"
  else
    PY=$PYTHON
  fi
  MBREC=("$PY" -m mbrec)
  echo "# datasets: ${MBREC_DATASETS:-not found (set MBREC_DATASETS)}"
  echo "# one training epoch per model (timeout 150 s each, $BUDGET s budget in all)"
  for m in "${MODELS[@]}"; do
    ds=$(dataset_for "$m"); cfg=$(config_for "$m" "$ds")
    train_cmd "$m" "$ds" "$cfg" "$WORK/runs/$m-$ds"
    if [ -n "$cfg" ]; then printf '%s\n' "$(quote "${TRAIN_CMD[@]}")"
    else printf '%s\n' "$(quote "${TRAIN_CMD[@]}")  # no configs/$m/$ds.yaml: model defaults"; fi
  done
  echo "# mbrec bench per model (timeout 90 s each)"
  for m in "${MODELS[@]}"; do
    ds=$(dataset_for "$m"); cfg=$(config_for "$m" "$ds")
    bench_cmd "$m" "$ds" "$cfg"
    printf '%s\n' "$(quote "${BENCH_CMD[@]}")"
  done
  exit 0
fi

case "$DATA_ARCHIVE" in /*|"") ;; *) DATA_ARCHIVE="$START_DIR/$DATA_ARCHIVE" ;; esac
cd "$REPO" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: > "$LOG"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
write_report

# ---------------------------------------------------------------- 1. python, torch, mbrec
PY=$PYTHON
if [ "$INSTALL" = 1 ]; then
  run_timed 60 venv "$PYTHON" -m venv --system-site-packages "$VENV"
  if [ "$RC" = 0 ] && [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
    # A venv made from a venv's python sees the *base* interpreter's packages, not that venv's
    # (where a GPU image keeps its CUDA torch): list the launching python's folders in a .pth.
    site_dir=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
    if [ -n "$site_dir" ]; then
      "$PYTHON" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() + [site.getusersitepackages()]))' \
        > "$site_dir/_gpu_check_parent_site.pth" 2>/dev/null
    fi
    note "venv $VENV (system packages and those of $PYTHON visible)"
  else
    note "no venv ($(last_error)); using $PYTHON as it is"
  fi
  run_timed 180 pip-torch "$PY" -m pip install --retries 0 --timeout 20 "$TORCH_PIN"
  if [ "$RC" = 0 ]; then
    note "pip install $TORCH_PIN: ok"
  else
    note "pip install $TORCH_PIN: $(status_of) ($(last_error)); keeping the torch already there"
  fi
  run_timed 120 pip-mbrec "$PY" -m pip install --retries 0 --timeout 20 -e "$REPO"
  if [ "$RC" != 0 ]; then
    run_timed 90 pip-mbrec-nodeps "$PY" -m pip install --no-deps --no-build-isolation -e "$REPO"
    if [ "$RC" = 0 ]; then
      note "pip install -e . needed --no-deps --no-build-isolation (dependencies as found, pins not enforced)"
    else
      note "pip install -e . failed, also with --no-deps --no-build-isolation: $(status_of) ($(last_error))"
    fi
  else
    note "pip install -e .: ok"
  fi
fi
if ! "$PY" -c 'import mbrec' > /dev/null 2>&1; then
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  note "mbrec not installed: run from $REPO/src (PYTHONPATH)"
fi
MBREC=("$PY" -m mbrec)

run_timed 60 torch-info "$PY" -c '
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}", end="")
if torch.cuda.is_available():
    print(f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, cuda {torch.version.cuda}", end="")
print(f", {torch.get_num_threads()} cpu threads by default")'
TORCH_INFO=$(tail -n 1 "$CMD_OUT")
if [ "$RC" = 0 ]; then note "$TORCH_INFO"; else note "torch does not import: $(last_error)"; fi
case "$TORCH_INFO" in
  *"cuda available True"*) ;;
  *) [ "$DEVICE" = cuda ] && note "WARNING: torch.cuda.is_available() is not True: every --device cuda command will fail" ;;
esac

find_datasets
note "datasets: ${MBREC_DATASETS:-not found (set MBREC_DATASETS; only built-in data will load)}"

# ---------------------------------------------------------------- 2. one epoch per model
# one line from `mbrec train --json`'s metrics
SUMMARIZE='
import json, sys
try:
    m = json.loads(sys.stdin.read())
except ValueError:
    print("no JSON metrics printed")
    sys.exit()
test = m.get("test", {}).get(m.get("target"), {})
shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k in ("HR@10", "NDCG@10"))
epoch, evals = m.get("epoch_seconds_median", 0.0), m.get("eval_seconds", 0.0)
dev, tv = m.get("device"), m.get("torch")
line = f"epoch {epoch:.1f} s, final eval {evals:.1f} s, device {dev}, torch {tv}"
print(line + (f", test {shown}" if shown else ""))
'
for m in "${MODELS[@]}"; do
  ds=$(dataset_for "$m"); cfg=$(config_for "$m" "$ds")
  train_cmd "$m" "$ds" "$cfg" "$WORK/runs/$m-$ds"
  run_timed 150 "train-$m" "${TRAIN_CMD[@]}"
  result="config ${cfg:-none (model defaults)}"
  if [ "$RC" = 0 ]; then
    json_line=$(grep '^{' "$CMD_OUT" | tail -n 1)
    threads=$(grep -o '[0-9]* threads' "$WORK/runs/$m-$ds/train.log" 2>/dev/null | head -n 1)
    result="$result; $(printf '%s' "$json_line" | "$PY" -c "$SUMMARIZE" 2>&1 | tail -n 1)${threads:+, $threads}"
  elif [ "$RC" != 125 ]; then
    result="$result; $(last_error)"
  fi
  ROWS+=("| $m | $ds | train, 1 epoch | $(status_of) | $WALL | $result |")
  write_report
done

# ---------------------------------------------------------------- 3. mbrec bench per model
run_timed 60 bench-help "${MBREC[@]}" bench --help
if [ "$RC" != 0 ]; then
  note "mbrec bench is not available in this version ($(last_error)): bench skipped"
  for m in "${MODELS[@]}"; do
    ROWS+=("| $m | $(dataset_for "$m") | bench | not available | 0 | no \`mbrec bench\` subcommand |")
  done
else
  for m in "${MODELS[@]}"; do
    ds=$(dataset_for "$m"); cfg=$(config_for "$m" "$ds")
    bench_cmd "$m" "$ds" "$cfg"
    run_timed 90 "bench-$m" "${BENCH_CMD[@]}"
    if [ "$RC" = 0 ]; then
      result="table below"
      BENCH_OUT+=$'\n'"### $m on $ds"$'\n\n'"\`$(quote "${BENCH_CMD[@]}")\`"$'\n\n'"$(grep -v '^\s*$' "$CMD_OUT" | grep -iv 'warning')"$'\n'
    elif [ "$RC" = 125 ]; then
      result=""
    else
      result=$(last_error)
    fi
    ROWS+=("| $m | $ds | bench --steps $STEPS | $(status_of) | $WALL | $result |")
    write_report
  done
fi

write_report
echo
cat "$REPORT"
echo
echo "gpu_check: report $REPORT, command output $LOG, run folders $WORK/runs"
