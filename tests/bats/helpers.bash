# Shared setup for the runbook bats suites: an isolated sandbox per test with fake nvidia-smi and
# torchrun first on PATH, a fake venv whose `python -m nsa.train` is the fake trainer
# (fakes/python), stub configs, and every output folder under $BATS_TEST_TMPDIR.

REPO="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
FAKES="$BATS_TEST_DIRNAME/fakes"

setup_sandbox() {
    T="$BATS_TEST_TMPDIR"
    # the real venv (for matplotlib in handoff's plot); the runner itself gets the fake venv
    local real_venv=${NSA_REAL_VENV:-${VENV_DIR:-$REPO/.venv}}
    [[ $real_venv == /* ]] || real_venv="$REPO/$real_venv"
    mkdir -p "$T/venv/bin" "$T/configs" "$T/bin"
    ln -s "$FAKES/python" "$T/venv/bin/python"
    if [[ -x $real_venv/bin/python ]]; then
        # what the fake python hands non-trainer calls to (a wrapper: a symlink would lose the venv)
        printf '#!/bin/sh\nexec "%s" "$@"\n' "$real_venv/bin/python" >"$T/bin/python3"
        chmod +x "$T/bin/python3"
    fi
    for c in m7c_125m_24g m7c_125m_40g m7c_125m_80g m7c_cpu smoke; do
        printf 'model:\n  dim: 64\ntrain:\n  steps: 20\n  out_dir: artifacts/m7c_125m\n' >"$T/configs/$c.yaml"
    done
    export PATH="$FAKES:$T/bin:$PATH"
    export VENV_DIR="$T/venv" CONFIG_DIR="$T/configs" OUT_DIR="$T/out" RUNS_ROOT="$T/runs"
    export NSA_IB_SYSFS="$T/no-infiniband" RESTART_BACKOFF_S=0 FAKE_STATE_DIR="$T"
    export FAKE_TRAIN_LOG="$T/trainer_calls.log" FAKE_TORCHRUN_LOG="$T/torchrun_calls.log" FAKE_ENV_LOG="$T/trainer_env.log"
    unset NGPU CONFIG DATASET STEPS SKIP_SMOKE SUPERVISE MAX_RESTARTS NNODES NODE_RANK MASTER_ADDR MASTER_PORT \
          LAUNCHER RESUME DRY_RUN SMOKE_CONFIG CUDA_VISIBLE_DEVICES FAKE_GPU_COUNT FAKE_GPU_VRAM_GB FAKE_GPU_VRAM_MIB \
          FAKE_GPU_TOPO FAKE_SMOKE_RC FAKE_TRAIN_RCS FAKE_TRAIN_SLEEP FAKE_TRAIN_PRINT FAKE_SMOKE_NAN \
          FAKE_TRAIN_HANG_AT FAKE_TRAIN_STATUS FAKE_PREFLIGHT_RC SKIP_PREFLIGHT GPU_HOURLY_USD ALERT_WEBHOOK_URL \
          STALL_TIMEOUT_S STALL_STARTUP_S STALL_KILL_GRACE_S STALL_POLL_S NSA_WATCH_DIR ALERT_TIMEOUT_S ALERT_RETRIES
    local v
    for v in $(env | sed -n 's/^\(NCCL_[A-Za-z0-9_]*\|TORCH_NCCL_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
}

runner() { bash "$REPO/scripts/train_m7c_prime.sh" "$@"; }

# the newest run folder
run_dir() { ls -1d "$RUNS_ROOT"/m7c_* | sort | tail -n1; }

# run.info value of KEY (first match)
info_value() { sed -n "s/^$1: *//p" "$(run_dir)/run.info" | head -n1; }
