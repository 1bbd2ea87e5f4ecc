#!/usr/bin/env bash
# Bundle a run for whoever takes over: one .tar.gz with run.info, smoke.log, train.log, runner.log,
# training.csv, val.csv, metrics.json, the resolved config, the run report (report/: report.md and
# loss/validation/throughput PNGs, scripts/report.py), stall stack dumps (stalls/), the latest checkpoint,
# git/environment info and SHA256SUMS. Refuses (exit 6, no bundle) when any file looks like it holds
# a token or secret (scripts/secrets_scan.py).
#
#   bash scripts/handoff.sh [--no-checkpoint] [--with-models] [--out FILE.tar.gz] [RUN_DIR]
#   RUN_DIR defaults to the newest run (artifacts/train_runs/latest); OUT_DIR overrides the trainer
#   output folder recorded in run.info.
set -euo pipefail
NSA_LOG_TAG=handoff
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NSA_REPO_ROOT"

with_ckpt=1 with_models=0 out_file="" run_dir=""
while (( $# )); do
    case $1 in
        --no-checkpoint) with_ckpt=0; shift ;;
        --with-models) with_models=1; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a file name, e.g. --out handoff.tar.gz."; out_file=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option '$1'. Fix: use --no-checkpoint, --with-models, --out FILE or a run folder." ;;
        *) [[ -z $run_dir ]] || die "more than one run folder given ('$run_dir', '$1'). Fix: pass one."; run_dir=$1; shift ;;
    esac
done

runs_root=$(abspath "${RUNS_ROOT:-artifacts/train_runs}")
if [[ -z $run_dir ]]; then
    if [[ -d $runs_root/latest ]]; then run_dir=$(cd "$runs_root/latest" && pwd -P)
    else run_dir=$(ls -1d "$runs_root"/m7c_* 2>/dev/null | sort | tail -n1 || true); fi
    [[ -n $run_dir ]] || die "no run folder under $(relpath "$runs_root"). Fix: pass one (bash scripts/handoff.sh artifacts/train_runs/m7c_...) or start a run first."
fi
run_dir=$(abspath "$run_dir")
[[ -d $run_dir ]] || die "run folder '$run_dir' does not exist. Fix: ls $(relpath "$runs_root")/"
run_id=$(basename "$run_dir")

out_dir=${OUT_DIR:-}
if [[ -z $out_dir && -f $run_dir/run.info ]]; then
    out_dir=$(sed -n 's/^out_dir: *//p' "$run_dir/run.info" | head -n1)
fi
out_dir=$(abspath "${out_dir:-artifacts/m7c_125m}")
log "run folder $(relpath "$run_dir"); trainer outputs $(relpath "$out_dir")"

py=python3
[[ -x $(venv_dir)/bin/python ]] && py=$(venv_dir)/bin/python

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/handoff_$run_id"
mkdir -p "$stage"
missing=()
take() {  # take SRC [DEST_NAME]: copy into the bundle or record it as missing
    if [[ -f $1 ]]; then cp -p "$1" "$stage/${2:-$(basename "$1")}"; else missing+=("$(relpath "$1")"); fi
}
for f in run.info preflight.log smoke.log train.log runner.log; do take "$run_dir/$f"; done
if [[ -d $run_dir/stalls ]]; then  # the watchdog's stack dumps, when a stall was detected
    mkdir -p "$stage/stalls"
    find "$run_dir/stalls" -maxdepth 1 -type f -name 'stall_*' -exec cp -p {} "$stage/stalls/" \;
fi
for f in training.csv val.csv metrics.json config.yaml best-model.json final-model.json; do take "$out_dir/$f"; done
# which Triton kernel variants the run chose (only on CUDA, so not listed as missing)
if [[ -f $out_dir/kernel_tuning.json ]]; then take "$out_dir/kernel_tuning.json"; fi
if (( with_models )); then for f in best-model.safetensors final-model.safetensors; do take "$out_dir/$f"; done; fi
if (( with_ckpt )); then
    ckpt=$(latest_checkpoint "$out_dir")
    if [[ -n $ckpt ]]; then mkdir -p "$stage/checkpoints"; cp -p "$ckpt" "$stage/checkpoints/"; log "including $(relpath "$ckpt") ($(du -h "$ckpt" | cut -f1))"
    else missing+=("$(relpath "$out_dir")/checkpoint_step*.pt"); fi
else
    log "checkpoint left out (--no-checkpoint)"
fi

# the run report (scripts/report.py) -> report/; of the run folder when it has run.info (restarts, stalls,
# node time), else of the trainer's out_dir alone
if [[ ! -f $out_dir/training.csv ]]; then
    missing+=("report/ (report.md and PNGs: no training.csv)")
elif [[ -z $(sed -n '2{/[^[:space:]]/p;}' "$out_dir/training.csv") ]]; then
    missing+=("report/ (report.md and PNGs: training.csv has no rows yet)")
else
    report_src=$out_dir; [[ -f $run_dir/run.info ]] && report_src=$run_dir
    OUT_DIR=$out_dir "$py" "$NSA_REPO_ROOT/scripts/report.py" "$report_src" --out "$stage/report" >/dev/null \
        || die "could not render the run report from $(relpath "$out_dir") (see the line above). Fix: bash scripts/prime_bootstrap.sh (matplotlib), or check training.csv/val.csv/metrics.json; python scripts/report.py $(relpath "$report_src") shows the same error."
fi

{
    echo "# environment of the handoff (generated $(_ts))"
    echo "host: ${HOSTNAME:-$(uname -n)}"
    echo "git_commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "git_branch: $(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)"
    echo "git_remote: $(git remote get-url origin 2>/dev/null | sed -E 's#(://)[^/@]*@#\1#' || echo none)"
    echo "git_status:"; git status --porcelain 2>/dev/null | sed 's/^/  /' || true
    echo "os: $(uname -srm)"
    echo "python: $("$py" --version 2>&1)"
    "$py" -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)' 2>/dev/null || echo "torch: not importable"
    echo "nvidia-smi:"; (nvidia-smi 2>/dev/null || echo "  (no nvidia-smi / no GPU)") | sed 's/^/  /'
    echo "pip freeze:"; ("$py" -m pip freeze 2>/dev/null || true) | sed 's/^/  /'
} | "$py" "$NSA_REPO_ROOT/scripts/secrets_scan.py" redact >"$stage/env.txt"

if (( ${#missing[@]} )); then
    printf '%s\n' "# files the run did not produce (yet)" "${missing[@]}" >"$stage/MISSING.txt"
    warn "not in the bundle (missing): ${missing[*]}"
fi

if ! hits=$("$py" "$NSA_REPO_ROOT/scripts/secrets_scan.py" scan "$stage"); then
    _emit ERROR "refusing to build the bundle: these files look like they contain a token or secret:"
    sed "s#$tmp/##" <<<"$hits" | sed 's/^/    /' >&2
    die "remove the secret from those files (and rotate it), then re-run handoff." "$NSA_EXIT_SECRET"
fi

(cd "$stage" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum >SHA256SUMS)
if [[ -z $out_file ]]; then
    mkdir -p "$NSA_REPO_ROOT/artifacts/handoff"
    out_file="$NSA_REPO_ROOT/artifacts/handoff/handoff_${run_id}_$(date -u +%Y%m%d-%H%M%S).tar.gz"
fi
out_file=$(abspath "$out_file")
mkdir -p "$(dirname "$out_file")"
tar -C "$tmp" -czf "$out_file.partial" "handoff_$run_id" && mv "$out_file.partial" "$out_file"
log "bundle: $(relpath "$out_file") ($(du -h "$out_file" | cut -f1), $(wc -l <"$stage/SHA256SUMS") files, sha256 $(sha256sum "$out_file" | cut -c1-16)...)"
log "check it: tar -xzf $(relpath "$out_file") && (cd handoff_$run_id && sha256sum -c SHA256SUMS)"
