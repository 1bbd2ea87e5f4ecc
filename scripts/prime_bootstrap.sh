#!/usr/bin/env bash
# One-time node setup: checks Python and disk, creates .venv, installs the pinned requirements
# (requirements-gpu.txt when nvidia-smi sees a GPU, else requirements-cpu.txt), then verifies that
# torch imports, CUDA is usable and a real matmul runs on every GPU. Idempotent: with unchanged
# requirements a re-run only re-verifies (seconds).
#
#   bash scripts/prime_bootstrap.sh
#   Overrides: VENV_DIR (default .venv), PYTHON (interpreter for the venv), REQUIREMENTS (file),
#              MIN_FREE_GB (default 30 with a GPU, 3 without), SKIP_VERIFY=1
set -euo pipefail
NSA_LOG_TAG=bootstrap
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NSA_REPO_ROOT"
t0=$SECONDS

base=$(find_base_python) || die "no Python >= 3.10 found on PATH. Fix: install python3.11 (apt-get install -y python3 python3-venv) or set PYTHON=/path/to/python3."
log "python: $base ($("$base" --version 2>&1))"

detect_gpus
if (( GPU_COUNT > 0 )); then
    log "gpus: $GPU_MODELS; VRAM per GPU (GiB): $(for m in $GPU_VRAM_LIST; do printf '%s ' "$(mib_to_gib "$m")"; done); driver $GPU_DRIVER; CUDA (driver) $GPU_CUDA"
else
    log "gpus: none visible to nvidia-smi (CPU setup)"
fi

min_free=${MIN_FREE_GB:-$(( GPU_COUNT > 0 ? 30 : 3 ))}
free_kb=$(df -Pk "$NSA_REPO_ROOT" | awk 'NR == 2 { print $4 }')
free_gb=$(( free_kb / 1024 / 1024 ))
log "disk: $free_gb GiB free in $NSA_REPO_ROOT (need >= $min_free GiB)"
(( free_gb >= min_free )) || die "only $free_gb GiB free on the disk holding $NSA_REPO_ROOT (need $min_free GiB for the venv and checkpoints). Fix: free space, attach a larger volume, or set MIN_FREE_GB if you know better."

if [[ -n ${REQUIREMENTS:-} ]]; then req=$REQUIREMENTS
elif (( GPU_COUNT > 0 )); then req=requirements-gpu.txt
else req=requirements-cpu.txt; fi
ensure_venv "$req"

if is_true "${SKIP_VERIFY:-0}"; then
    log "verification skipped (SKIP_VERIFY=1)"
else
    "$(venv_dir)/bin/python" "$NSA_REPO_ROOT/scripts/verify_env.py" --expect-gpus "$GPU_COUNT" \
        || die "environment verification failed (see the ERROR lines above)." 1
fi
log "bootstrap OK in $(( SECONDS - t0 )) s. Next: bash scripts/train_m7c_prime.sh"
