#!/usr/bin/env bash
# The one-command runner: picks the config and launcher from the hardware, sets the NCCL environment,
# runs the smoke gate, then trains M7C with auto-resume under a crash supervisor.
#
#   bash scripts/train_m7c_prime.sh [trainer overrides, e.g. train.lr=3e-4]
#   DRY_RUN=1 bash scripts/train_m7c_prime.sh      # print every decision, change nothing
#
# Every automatic choice has an environment override (CONFIG, NGPU, DATASET, STEPS, SKIP_SMOKE,
# OUT_DIR, SUPERVISE, MAX_RESTARTS, ...): see RUNBOOK.md "Runner settings", or `--help`.
set -euo pipefail
NSA_LOG_TAG=runner
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NSA_REPO_ROOT"

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '/^## Runner settings/,/^## /p' RUNBOOK.md 2>/dev/null | sed '$d' || true
    echo "usage: [VAR=value ...] bash scripts/train_m7c_prime.sh [dotted.key=value ...]"
    exit 0
fi
for a in "$@"; do
    [[ $a == *=* && $a != -* ]] || die "unexpected argument '$(redact_arg "$a")': the runner passes only dotted config overrides (key=value) to the trainer. Fix: use the environment variables in RUNBOOK.md (e.g. STEPS=1000) or key=value overrides."
done

# ---------------------------------------------------------------- decisions (no side effects)
NSA_HOST=${HOSTNAME:-$(uname -n)}
int_or_die() { [[ ${!1} =~ ^[0-9]+$ ]] || die "$1='${!1}' is not a non-negative integer. Fix: e.g. $1=$2."; }

detect_gpus
NPROC=$GPU_COUNT
NGPU_WHY="detected by nvidia-smi"
(( GPU_COUNT > 0 )) || NGPU_WHY="no GPU visible to nvidia-smi"
if [[ -n ${NGPU:-} ]]; then
    int_or_die NGPU 1
    if (( NGPU > GPU_COUNT )); then
        die "NGPU=$NGPU but nvidia-smi sees $GPU_COUNT GPU(s). Fix: set NGPU to at most $GPU_COUNT (NGPU=0 forces CPU), or check the driver with nvidia-smi."
    fi
    NPROC=$NGPU NGPU_WHY="NGPU=$NGPU (your override; $GPU_COUNT detected)"
    if (( NGPU == 0 && GPU_COUNT > 0 )); then
        export CUDA_VISIBLE_DEVICES=""   # NGPU=0 means CPU: hide the GPUs from the trainer too
        NGPU_WHY+="; GPUs hidden with CUDA_VISIBLE_DEVICES=''"
    fi
fi

if [[ -n ${CONFIG:-} ]]; then
    CONFIG_WHY="CONFIG (your override)"
elif (( NPROC == 0 )); then
    CONFIG=$(cpu_config); CONFIG_WHY="no GPU: CPU default"
else
    CONFIG=$(config_for_vram "$GPU_VRAM_MIB")
    CONFIG_WHY="largest GPU has $(mib_to_gib "$GPU_VRAM_MIB") GiB (tiers: >=75 GiB 80g, >=35 GiB 40g, else 24g)"
    if (( GPU_MIN_VRAM_MIB != GPU_VRAM_MIB )); then
        warn "GPUs have different memory sizes ($GPU_VRAM_LIST MiB): the config is sized for the largest. Fix if the smaller ones run out of memory: CONFIG=$(config_for_vram "$GPU_MIN_VRAM_MIB")"
    fi
fi
[[ -f $CONFIG ]] || die "config file '$CONFIG' not found (chosen by: $CONFIG_WHY). Fix: set CONFIG to an existing file, e.g. CONFIG=configs/m7c_cpu.yaml (see ls configs/)."
SMOKE_CONFIG=${SMOKE_CONFIG:-${CONFIG_DIR:-configs}/smoke.yaml}

NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_PORT=${MASTER_PORT:-29500}
int_or_die NNODES 2; int_or_die NODE_RANK 0; int_or_die MASTER_PORT 29500
if (( NNODES > 1 )); then
    (( NPROC >= 1 )) || die "NNODES=$NNODES needs GPUs on every node, but this node has none. Fix: run on GPU nodes or unset NNODES."
    [[ -n ${MASTER_ADDR:-} ]] || die "NNODES=$NNODES but MASTER_ADDR is not set. Fix: export MASTER_ADDR=<address of the node with NODE_RANK=0> on every node."
    (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES. Fix: number the nodes 0..$((NNODES - 1))."
fi
WORLD=$(( NPROC > 0 ? NPROC * NNODES : 1 ))

LAUNCHER=${LAUNCHER:-auto}
case $LAUNCHER in
    auto) if (( NNODES > 1 || NPROC >= 2 )); then LAUNCHER=torchrun; else LAUNCHER=python; fi ;;
    python|torchrun) ;;
    *) die "LAUNCHER='$LAUNCHER' is not one of auto, python, torchrun. Fix: unset LAUNCHER." ;;
esac
if [[ $LAUNCHER == torchrun ]]; then
    if (( NNODES > 1 )); then
        LAUNCH=(torchrun "--nnodes=$NNODES" "--node_rank=$NODE_RANK" "--master_addr=$MASTER_ADDR"
                "--master_port=$MASTER_PORT" "--nproc_per_node=$NPROC")
    else
        LAUNCH=(torchrun --standalone "--nproc_per_node=$(( NPROC > 0 ? NPROC : 1 ))")
    fi
    # the smoke gate runs on this node only (each node checks itself before the joint run)
    SMOKE_LAUNCH=(torchrun --standalone "--nproc_per_node=$(( NPROC > 0 ? NPROC : 1 ))")
    LAUNCH+=(-m nsa.train); SMOKE_LAUNCH+=(-m nsa.train)
else
    LAUNCH=(python -m nsa.train); SMOKE_LAUNCH=(python -m nsa.train)
fi

setup_nccl_env "$WORLD"

if [[ -z ${OUT_DIR:-} ]]; then
    OUT_DIR=$(yaml_train_out_dir "$CONFIG")
    OUT_DIR=${OUT_DIR:-artifacts/m7c_125m}
fi
RUNS_ROOT=${RUNS_ROOT:-artifacts/train_runs}

RESUME=${RESUME:-auto}
case $RESUME in
    auto) RESUME_FROM=$(latest_checkpoint "$(abspath "$OUT_DIR")")
          [[ -n $RESUME_FROM ]] || RESUME_FROM="none (no checkpoint in $OUT_DIR: fresh start)" ;;
    none) RESUME_FROM="none (RESUME=none: fresh start; existing checkpoints in $OUT_DIR are ignored)" ;;
    *) [[ -f $RESUME ]] || die "RESUME=$RESUME: no such checkpoint file. Fix: RESUME=auto (newest valid in OUT_DIR), none, or a path to checkpoint_step{N}.pt."
       RESUME_FROM=$RESUME ;;
esac

[[ -n ${SUPERVISE-} ]] && NSA_SUPERVISE_SET=1
if (( NPROC >= 1 )); then SUPERVISE=${SUPERVISE:-1}; else SUPERVISE=${SUPERVISE:-0}; fi
MAX_RESTARTS=${MAX_RESTARTS:-5}; RESTART_BACKOFF_S=${RESTART_BACKOFF_S:-30}; RESTART_BACKOFF_MAX_S=${RESTART_BACKOFF_MAX_S:-600}
int_or_die MAX_RESTARTS 5; int_or_die RESTART_BACKOFF_S 30; int_or_die RESTART_BACKOFF_MAX_S 600
SKIP_SMOKE=${SKIP_SMOKE:-0}
SKIP_PREFLIGHT=${SKIP_PREFLIGHT:-0}
STALL_TIMEOUT_S=${STALL_TIMEOUT_S:-1200}; STALL_STARTUP_S=${STALL_STARTUP_S:-1800}; STALL_KILL_GRACE_S=${STALL_KILL_GRACE_S:-60}
int_or_die STALL_TIMEOUT_S 1200; int_or_die STALL_STARTUP_S 1800; int_or_die STALL_KILL_GRACE_S 60
ALERT_FINISH_WAIT_S=${ALERT_FINISH_WAIT_S:-5}; int_or_die ALERT_FINISH_WAIT_S 5
if [[ -n ${GPU_HOURLY_USD:-} ]]; then
    [[ $GPU_HOURLY_USD =~ ^[0-9]+([.][0-9]+)?$ ]] || die "GPU_HOURLY_USD='$GPU_HOURLY_USD' is not a price. Fix: your USD per GPU-hour, e.g. GPU_HOURLY_USD=2.49 (or unset it)."
    PRICE_WHY="GPU_HOURLY_USD=$GPU_HOURLY_USD per GPU-hour (x $WORLD GPU(s) on this run)"
else
    PRICE_WHY="GPU_HOURLY_USD not set: the config's runtime.usd_per_gpu_hour if > 0, else time only (no dollars)"
fi
if ! is_true "$SKIP_SMOKE"; then
    [[ -f $SMOKE_CONFIG ]] || die "smoke config '$SMOKE_CONFIG' not found. Fix: restore configs/smoke.yaml, set SMOKE_CONFIG, or SKIP_SMOKE=1 (not recommended on a paid node)."
fi

TRAIN_ARGS=(--config "$CONFIG" --resume "$RESUME" --out-dir "$OUT_DIR")
[[ -n ${DATASET:-} ]] && TRAIN_ARGS+=(--dataset "$DATASET")
if [[ -n ${STEPS:-} ]]; then int_or_die STEPS 1000; TRAIN_ARGS+=(--steps "$STEPS"); fi
TRAIN_ARGS+=("$@")
TRAIN_CMD=("${LAUNCH[@]}" "${TRAIN_ARGS[@]}")
RUN_DIR_SHOWN="$RUNS_ROOT/m7c_YYYYmmdd-HHMMSS"

print_decisions() {
    log "config       : $CONFIG  [$CONFIG_WHY]"
    log "gpus         : $NPROC used per node [$NGPU_WHY]; models: $GPU_MODELS; VRAM per GPU (GiB): $( [[ -n $GPU_VRAM_LIST ]] && for m in $GPU_VRAM_LIST; do printf '%s ' "$(mib_to_gib "$m")"; done || echo n/a)"
    log "driver/cuda  : driver $GPU_DRIVER, CUDA (driver) $GPU_CUDA"
    log "nodes        : NNODES=$NNODES NODE_RANK=$NODE_RANK${MASTER_ADDR:+ MASTER_ADDR=$MASTER_ADDR} MASTER_PORT=$MASTER_PORT (world size $WORLD)"
    log "launcher     : $LAUNCHER"
    log "topology     : $NSA_TOPOLOGY"
    local l; for l in "${NCCL_ENV_REPORT[@]}"; do log "nccl env     : $l"; done
    if is_true "$SKIP_SMOKE"; then log "smoke gate   : SKIPPED (SKIP_SMOKE=$SKIP_SMOKE)"
    else log "smoke gate   : $(quote_cmd "${SMOKE_LAUNCH[@]}" --config "$SMOKE_CONFIG" --dataset synthetic --out-dir "$RUN_DIR_SHOWN/smoke" --resume none) (then resume from its mid-way checkpoint)"
    fi
    log "train command: $(quote_cmd "${TRAIN_CMD[@]}")"
    log "out dir      : $OUT_DIR"
    log "resume from  : $RESUME_FROM"
    log "run folder   : $RUN_DIR_SHOWN$([[ -n ${RUN_DIR-} && -d ${RUN_DIR-} ]] || echo " (created at start)")"
    if is_true "$SUPERVISE"; then log "supervisor   : on (restart on crash up to $MAX_RESTARTS times, backoff ${RESTART_BACKOFF_S}s doubling to ${RESTART_BACKOFF_MAX_S}s; never after exit 2, 3 or 143)"
    else log "supervisor   : off (SUPERVISE=$SUPERVISE$( (( NPROC == 0 )) && [[ -z ${NSA_SUPERVISE_SET-} ]] && echo "; default off on CPU"))"; fi
    if is_true "$SKIP_PREFLIGHT"; then log "pre-flight   : SKIPPED (SKIP_PREFLIGHT=$SKIP_PREFLIGHT)"
    else log "pre-flight   : $(quote_cmd python -m nsa.preflight "${TRAIN_ARGS[@]}" --world-size "$WORLD" --expect-gpus "$NPROC")"; fi
    if (( STALL_TIMEOUT_S > 0 )); then log "watchdog     : a launch with no progress for ${STALL_TIMEOUT_S}s (${STALL_STARTUP_S}s before its first step) gets its stacks dumped and is stopped, then restarted if the supervisor is on (STALL_TIMEOUT_S)"
    else log "watchdog     : off (STALL_TIMEOUT_S=0)"; fi
    log "price        : $PRICE_WHY"
    log "alerts       : $( [[ -n ${ALERT_WEBHOOK_URL:-} ]] && echo "on (ALERT_WEBHOOK_URL is set; its value is never shown)" || echo "off (set ALERT_WEBHOOK_URL to a Slack-compatible webhook)")"
}

if is_true "${DRY_RUN:-0}"; then
    log "DRY RUN: printing decisions only (no bootstrap, no lock, no run folder, no training)"
    print_decisions
    exit 0
fi

# ---------------------------------------------------------------- bootstrap, lock, run folder
if [[ ! -x $(venv_dir)/bin/python ]]; then
    log "no virtual environment at $(relpath "$(venv_dir)"): bootstrapping first"
    bash "$NSA_REPO_ROOT/scripts/prime_bootstrap.sh" || die "bootstrap failed (see above). Fix the reported problem and re-run." $?
fi
activate_venv
NSA_TEE_PYTHON=$(command -v python)

OUT_ABS=$(abspath "$OUT_DIR")
acquire_lock "$OUT_ABS" "pid $$ on $NSA_HOST, started $(_ts), user ${USER:-$(id -un)};"
RUN_DIR=$(new_run_dir "$(abspath "$RUNS_ROOT")")
NSA_RUN_ID=$(basename "$RUN_DIR")
printf 'run folder %s\n' "$(relpath "$RUN_DIR")" >&9 2>/dev/null || true
ln -sfn "$(basename "$RUN_DIR")" "$(abspath "$RUNS_ROOT")/latest"
NSA_LOG_FILE="$RUN_DIR/runner.log"
RUN_DIR_SHOWN=$(relpath "$RUN_DIR")
install_signal_forwarding
log "run folder $RUN_DIR_SHOWN (runner log: $RUN_DIR_SHOWN/runner.log)"
print_decisions

# ---------------------------------------------------------------- run.info
INFO="$RUN_DIR/run.info"
info() { printf '%-22s %s\n' "$1:" "$2" >>"$INFO"; }
versions=$(python - <<'EOF' 2>/dev/null || echo "unknown|unknown|unknown"
import sys
try:
    import torch
    tv, tc = torch.__version__, (torch.version.cuda or "none (CPU build)")
except Exception:
    tv, tc = "not importable", "unknown"
print(tv, tc, sys.version.split()[0], sep="|")
EOF
)
IFS='|' read -r TORCH_VERSION TORCH_CUDA PY_VERSION <<<"$versions"
config_summary=$(python - "$CONFIG" <<'EOF' 2>/dev/null || echo "unavailable"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1])) or {}
m, t = c.get("model", {}) or {}, c.get("train", {}) or {}
keys = [("model", m, ["dim", "n_layers", "n_heads", "n_kv_heads", "attention", "vocab_size"]),
        ("train", t, ["seq_len", "batch_size", "accumulate_grad_batches", "steps", "lr", "save_every", "eval_every"])]
print(" ".join(f"{k}={sec[k]}" for _, sec, ks in keys for k in ks if k in sec) or "no model/train keys")
EOF
)
commit=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout or no commit)")
if [[ $commit != unknown* ]] && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then commit="$commit (+ uncommitted changes)"; fi
{
    echo "# run.info — written by scripts/train_m7c_prime.sh; one 'key: value' per line, events appended"
} >"$INFO"
info run_id "$(basename "$RUN_DIR")"
info run_dir "$RUN_DIR_SHOWN"
info started_utc "$(_ts)"
info host "$NSA_HOST"
info git_commit "$commit"
info git_branch "$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)"
info config "$CONFIG"
info config_choice "$CONFIG_WHY"
info config_sha256 "$(sha256sum "$CONFIG" | cut -d' ' -f1)"
info config_summary "$config_summary"
info dataset "${DATASET:-from config}"
info steps "${STEPS:-from config}"
info out_dir "$OUT_DIR"
info device "$( (( NPROC > 0 )) && echo cuda || echo cpu)"
info gpu_count "$NPROC"
info gpu_count_detected "$GPU_COUNT"
info gpu_models "$GPU_MODELS"
info gpu_vram_gib "$( [[ -n $GPU_VRAM_LIST ]] && for m in $GPU_VRAM_LIST; do printf '%s ' "$(mib_to_gib "$m")"; done || echo n/a)"
info gpu_vram_max_gib "$(mib_to_gib "$GPU_VRAM_MIB")"
info driver_version "$GPU_DRIVER"
info cuda_driver_version "$GPU_CUDA"
info torch_version "$TORCH_VERSION"
info torch_cuda_version "$TORCH_CUDA"
info python_version "$PY_VERSION"
info python_executable "$(command -v python)"
info nnodes "$NNODES"
info node_rank "$NODE_RANK"
info master "${MASTER_ADDR:-localhost}:$MASTER_PORT"
info world_size "$WORLD"
info launcher "$LAUNCHER"
info topology "$NSA_TOPOLOGY"
for l in "${NCCL_ENV_REPORT[@]}"; do info nccl_env "$l"; done
info cuda_visible_devices "${CUDA_VISIBLE_DEVICES:-unset}"
info launch_command "$(quote_cmd "${TRAIN_CMD[@]}")"
info smoke "$(is_true "$SKIP_SMOKE" && echo "skipped (SKIP_SMOKE=$SKIP_SMOKE)" || echo "$SMOKE_CONFIG")"
info resume_mode "$RESUME"
info resume_from "$RESUME_FROM"
info supervise "$SUPERVISE (max_restarts=$MAX_RESTARTS, backoff=${RESTART_BACKOFF_S}s..${RESTART_BACKOFF_MAX_S}s)"
info runner_pid "$$"
info usd_per_gpu_hour "$PRICE_WHY"
info watchdog "$( (( STALL_TIMEOUT_S > 0 )) && echo "timeout ${STALL_TIMEOUT_S}s, startup ${STALL_STARTUP_S}s, kill grace ${STALL_KILL_GRACE_S}s" || echo "off")"
info alerts "$( [[ -n ${ALERT_WEBHOOK_URL:-} ]] && echo "on (webhook set, value not recorded)" || echo off)"

finish() {  # finish EXIT_CODE: record and exit (alerts still in flight get a few seconds)
    info finished_utc "$(_ts)"
    info exit_code "$1 ($(describe_exit "$1"))"
    release_lock
    wait_alerts "$ALERT_FINISH_WAIT_S"
    exit "$1"
}

# ---------------------------------------------------------------- pre-flight (before any training)
if ! is_true "$SKIP_PREFLIGHT"; then
    log "pre-flight: checking GPU, disk, data, tokenizer, token and schedule before spending anything"
    rc=0; run_logged "$RUN_DIR/preflight.log" python -m nsa.preflight "${TRAIN_ARGS[@]}" --world-size "$WORLD" --expect-gpus "$NPROC" || rc=$?
    (( NSA_STOP_REQUESTED == 0 )) || finish "$NSA_EXIT_PREEMPTED"
    if (( rc != 0 )); then
        why=$(grep -m1 -E 'FAIL|error' "$RUN_DIR/preflight.log" | sed -E 's/^[0-9TZ:-]+ //' || true)
        info preflight_result "FAILED (exit $rc): ${why:-see preflight.log}"
        alert preflight_failed "${why:-pre-flight exit $rc}; nothing was trained"
        _emit ERROR "pre-flight failed (the FAIL lines above; also $RUN_DIR_SHOWN/preflight.log). Nothing was trained. Fix them and re-run."
        finish "$NSA_EXIT_PREFLIGHT"
    fi
    info preflight_result "passed"
else
    info preflight_result "skipped (SKIP_PREFLIGHT=$SKIP_PREFLIGHT)"
fi
alert started "$(basename "$CONFIG") on $GPU_MODELS (world size $WORLD), steps ${STEPS:-from config}, out_dir $OUT_DIR; resume: $RESUME_FROM; price: $PRICE_WHY"

# ---------------------------------------------------------------- smoke gate
smoke_fail() {
    info smoke_result "FAILED: $1"
    alert smoke_failed "$1"
    _emit ERROR "smoke gate failed: $1. Nothing was trained. Read $RUN_DIR_SHOWN/smoke.log, fix, and re-run (SKIP_SMOKE=1 only if you know why)."
    finish "$NSA_EXIT_SMOKE"
}
smoke_leg() {  # smoke_leg NAME RESUME: one smoke launch under the watchdog; any failure ends the run
    prepare_watchdog "$RUN_DIR/watch" "$RUN_DIR/stalls" "$SMOKE_DIR/training.csv"
    rc=0; run_logged "$SMOKE_LOG" "${SMOKE_LAUNCH[@]}" --config "$SMOKE_CONFIG" --dataset synthetic --out-dir "$SMOKE_DIR" --resume "$2" || rc=$?
    (( NSA_STOP_REQUESTED == 0 )) || finish "$NSA_EXIT_PREEMPTED"
    if stall=$(stall_summary); then smoke_fail "$1 stalled: $stall"; fi
    (( rc == 0 )) || smoke_fail "$1 exited with code $rc ($(describe_exit "$rc")); log: $SMOKE_LOG"
}
if ! is_true "$SKIP_SMOKE"; then
    SMOKE_DIR="$RUN_DIR/smoke"; SMOKE_LOG="$RUN_DIR/smoke.log"
    log "smoke gate 1/2: uninterrupted run of $SMOKE_CONFIG -> $RUN_DIR_SHOWN/smoke"
    smoke_leg "the smoke run" none
    mapfile -t smoke_ckpts < <(ls "$SMOKE_DIR"/checkpoint_step*.pt 2>/dev/null | sed 's/.*checkpoint_step\([0-9]*\)\.pt$/\1 &/' | sort -n | cut -d' ' -f2-)
    (( ${#smoke_ckpts[@]} >= 2 )) || smoke_fail "the smoke run left ${#smoke_ckpts[@]} checkpoint(s); it must save mid-way and at the end (train.save_every in $SMOKE_CONFIG, keep_last_k >= 2); log: $SMOKE_LOG"
    mid=${smoke_ckpts[0]}; mid_step=$(checkpoint_step "$mid")
    cp "$SMOKE_DIR/training.csv" "$RUN_DIR/smoke_uninterrupted_training.csv" 2>/dev/null || true
    # simulate a crash right after the mid-way checkpoint: later checkpoints never existed
    for f in "${smoke_ckpts[@]:1}"; do rm -f "$f"; done
    log "smoke gate 2/2: resume from the mid-way checkpoint (step $mid_step) to the end"
    smoke_leg "the resumed smoke run" auto
    verdict=$(python "$NSA_REPO_ROOT/scripts/smoke_check.py" "$SMOKE_DIR" --straight "$RUN_DIR/smoke_uninterrupted_training.csv" --resumed-from "$mid_step" 2>&1) \
        || smoke_fail "$(grep -m1 FAILED <<<"$verdict" | sed 's/^smoke check FAILED: //')$(n=$(grep -c FAILED <<<"$verdict"); (( n > 1 )) && echo " (and $((n - 1)) more, see smoke.log)"); log: $SMOKE_LOG"
    printf '%s\n' "$verdict" | tee -a "$SMOKE_LOG"
    info smoke_result "passed: $(tail -n1 <<<"$verdict")"
fi

# ---------------------------------------------------------------- training under the supervisor
attempt=0
stalls=0
backoff=$RESTART_BACKOFF_S
while true; do
    attempt=$((attempt + 1))
    point=$(latest_checkpoint "$OUT_ABS")
    [[ $attempt -gt 1 || $RESUME == auto ]] && info "attempt_${attempt}_resume_from" "${point:-none (fresh start)}"
    info "attempt_${attempt}_started_utc" "$(_ts)"
    log "training attempt $attempt: $(quote_cmd "${TRAIN_CMD[@]}")"
    prepare_watchdog "$RUN_DIR/watch" "$RUN_DIR/stalls" "$OUT_ABS/training.csv"
    rc=0; run_logged "$RUN_DIR/train.log" "${TRAIN_CMD[@]}" || rc=$?
    info "attempt_${attempt}_exit" "$rc ($(describe_exit "$rc"))"
    if (( NSA_STOP_REQUESTED )); then
        log "stopped by a signal; the trainer exited with code $rc. Re-run the same command to resume."
        alert preempted "the runner was stopped by a signal; trainer exit $rc; $(run_summary "$OUT_ABS"). Re-run the same command to resume."
        finish "$NSA_EXIT_PREEMPTED"
    fi
    what="$(describe_exit "$rc")"
    if stall=$(stall_summary); then
        # a hung trainer: whatever its exit code (143 if it still answered SIGTERM), it is restarted
        stalls=$((stalls + 1))
        info "stall_$stalls" "attempt $attempt: $stall"
        warn "the watchdog stopped a stalled trainer: $stall"
        what="stalled ($stall)"; rc_final=$NSA_EXIT_STALLED; event=stalled
    else
        case $rc in
            0) status=$(sed -n 's/.*"status": *"\([a-z_]*\)".*/\1/p' "$OUT_ABS/metrics.json" 2>/dev/null | head -n1)
               log "training finished: ${status:-completed}. Outputs: $OUT_DIR; run folder: $RUN_DIR_SHOWN"
               alert "$( [[ $status == early_stopped ]] && echo early_stopped || echo completed)" "$(run_summary "$OUT_ABS"); outputs in $OUT_DIR"
               finish 0 ;;
            2) _emit ERROR "the trainer rejected its input (exit 2, not retried): see the message above or $RUN_DIR_SHOWN/train.log. Fix the config/override and re-run."
               alert failed "the trainer rejected its input (exit 2): see $RUN_DIR_SHOWN/train.log"
               finish 2 ;;
            3) _emit ERROR "training diverged (exit 3, not retried: it would replay the same data). Last good checkpoint kept in $OUT_DIR; lower train.lr or check the data, then re-run to resume."
               alert diverged "$(run_summary "$OUT_ABS"); last good checkpoint kept; lower train.lr or check the data"
               finish 3 ;;
            143) log "the trainer was preempted (exit 143): checkpoint saved. Re-run the same command to resume."
                 alert preempted "trainer got SIGTERM (exit 143), checkpoint saved; $(run_summary "$OUT_ABS"). Re-run the same command to resume."
                 finish 143 ;;
        esac
        rc_final=$rc; event=crashed
    fi
    if ! is_true "$SUPERVISE"; then
        _emit ERROR "training $what; supervisor off (SUPERVISE=$SUPERVISE). Log: $RUN_DIR_SHOWN/train.log. Re-run to resume from the newest checkpoint."
        alert "$event" "$what; supervisor off, not restarting; $(run_summary "$OUT_ABS")"
        finish "$rc_final"
    fi
    if (( attempt > MAX_RESTARTS )); then
        _emit ERROR "training $what again; gave up after $MAX_RESTARTS restart(s) (MAX_RESTARTS). Log: $RUN_DIR_SHOWN/train.log."
        alert "$event" "$what; gave up after $MAX_RESTARTS restart(s); $(run_summary "$OUT_ABS")"
        finish "$rc_final"
    fi
    warn "training $what; restart $attempt/$MAX_RESTARTS with --resume auto in ${backoff}s (log: $RUN_DIR_SHOWN/train.log)"
    alert "$event" "$what; restarting from the newest checkpoint ($attempt/$MAX_RESTARTS) in ${backoff}s; $(run_summary "$OUT_ABS")"
    info "restart_$attempt" "after $( [[ $event == stalled ]] && echo "a stall (exit $rc)" || echo "exit $rc"), backoff ${backoff}s"
    sleep "$backoff" & wait $! || true
    (( NSA_STOP_REQUESTED == 0 )) || finish "$NSA_EXIT_PREEMPTED"
    backoff=$(( backoff * 2 > RESTART_BACKOFF_MAX_S ? RESTART_BACKOFF_MAX_S : backoff * 2 ))
    (( backoff > 0 )) || backoff=0
    TRAIN_CMD=("${LAUNCH[@]}" "${TRAIN_ARGS[@]}")
    # restarts always continue from the newest valid checkpoint
    for i in "${!TRAIN_CMD[@]}"; do
        if [[ ${TRAIN_CMD[$i]} == --resume ]]; then TRAIN_CMD[$((i + 1))]=auto; fi
    done
done
