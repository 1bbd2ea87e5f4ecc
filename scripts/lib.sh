# shellcheck shell=bash
# scripts/lib.sh — the one shared bash library of the runbook scripts.
#
# Sourced (never executed) by prime_bootstrap.sh, train_m7c_prime.sh, run_tensorboard.sh, handoff.sh
# and test.sh. It holds every decision the runner makes (GPU detection, config tier, launcher, NCCL
# environment, lock, checkpoint discovery, run folder) so the entry scripts stay thin and the bats
# tests in tests/bats/ can exercise each decision with fake `nvidia-smi`/`torchrun` on PATH.
#
# Conventions: functions print one-line errors naming the thing and the fix (`die`), log lines go to
# stdout prefixed with the script's tag, and nothing here ever echoes a secret (see `redact_arg`).

# ---------------------------------------------------------------------------------------------
# Paths and logging
# ---------------------------------------------------------------------------------------------

NSA_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NSA_REPO_ROOT
: "${NSA_LOG_TAG:=nsa}"
NSA_LOG_FILE="${NSA_LOG_FILE:-}"   # when set, log/warn/die lines are also appended here

export PYTHONUNBUFFERED=1          # line-buffered Python output: logs never sit empty for minutes

_ts() { date -u +%Y-%m-%dT%H:%M:%SZ; }

_emit() {  # _emit LEVEL MESSAGE... -> one line to stdout (or stderr for errors) and NSA_LOG_FILE
    local level=$1; shift
    local line="[$NSA_LOG_TAG] $*"
    [[ $level == INFO ]] || line="[$NSA_LOG_TAG] $level: $*"
    if [[ $level == ERROR ]]; then printf '%s\n' "$line" >&2; else printf '%s\n' "$line"; fi
    if [[ -n $NSA_LOG_FILE ]]; then printf '%s %s\n' "$(_ts)" "$line" >>"$NSA_LOG_FILE" 2>/dev/null || true; fi
}
log()  { _emit INFO "$@"; }
warn() { _emit WARNING "$@"; }
# die MESSAGE [EXIT_CODE]: one clear line naming the thing and the fix, then exit (default 2 = user error).
die()  { _emit ERROR "$1"; exit "${2:-2}"; }

is_true() { case "${1,,}" in 1|true|yes|on) return 0 ;; *) return 1 ;; esac; }

abspath() {  # abspath PATH -> absolute path (relative paths are taken from the repo root)
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$NSA_REPO_ROOT/$1" ;;
    esac
}

relpath() {  # relpath PATH -> PATH relative to the repo root when inside it (for readable output)
    local p; p=$(abspath "$1")
    case "$p" in
        "$NSA_REPO_ROOT"/*) printf '%s\n' "${p#"$NSA_REPO_ROOT"/}" ;;
        *) printf '%s\n' "$p" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Secrets: never print them
# ---------------------------------------------------------------------------------------------

# Env var names whose values are secrets (matched case-insensitively, as in scripts/secrets_scan.py).
NSA_SECRET_NAME_RE='(TOKEN|KEY|SECRET|WEBHOOK|PASSWORD|PASSWD|CREDENTIAL)'

redact_arg() {  # redact_arg ARG -> ARG with secret-looking values replaced by ***
    local a=$1 name
    local lower=${a,,}
    if [[ $a == *=* ]]; then
        name=${a%%=*}
        if [[ ${name^^} =~ $NSA_SECRET_NAME_RE ]]; then printf '%s=***\n' "$name"; return; fi
    fi
    if [[ $a =~ hf_[A-Za-z0-9]{20,} || $lower == *hooks.slack.com/* || $lower == *discord.com/api/webhooks/* \
          || $lower == *discordapp.com/api/webhooks/* ]]; then
        printf '***\n'; return
    fi
    # values of secret-named environment variables, wherever they appear
    local var val
    while IFS='=' read -r var _; do
        [[ ${var^^} =~ $NSA_SECRET_NAME_RE ]] || continue
        val=${!var-}
        if [[ ${#val} -ge 8 && $a == *"$val"* ]]; then a=${a//"$val"/***}; fi
    done < <(env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' || true)
    printf '%s\n' "$a"
}

quote_cmd() {  # quote_cmd ARGS... -> one shell-quoted, redacted command line
    local out=() a
    for a in "$@"; do out+=("$(printf '%q' "$(redact_arg "$a")")"); done
    printf '%s\n' "${out[*]}"
}

# ---------------------------------------------------------------------------------------------
# Virtual environment
# ---------------------------------------------------------------------------------------------

venv_dir() { abspath "${VENV_DIR:-.venv}"; }

find_base_python() {  # prints an interpreter >= 3.10 to create the venv with, or fails
    local c
    for c in ${PYTHON:-} python3.12 python3.11 python3.10 python3 python; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    return 1
}

requirements_stamp() {  # requirements_stamp FILE PY -> hash of the file (and its -r includes) + interpreter
    local req=$1 py=$2 inc
    {
        cat "$req"
        for inc in $(sed -n 's/^[[:space:]]*\(-r\|--requirement\)[[:space:]=]*\([^[:space:]#]*\).*/\2/p' "$req"); do
            cat "$(dirname "$req")/$inc" 2>/dev/null || true
        done
        "$py" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# ensure_venv REQUIREMENTS_FILE: create $VENV_DIR if missing and install the pinned requirements
# unless the stamp says exactly this file is already installed (a re-run takes a second).
ensure_venv() {
    local req; req=$(abspath "$1")
    local venv; venv=$(venv_dir)
    [[ -f $req ]] || die "requirements file $req is missing. Fix: restore it from git (git checkout -- $(relpath "$req"))."
    if [[ ! -x $venv/bin/python ]]; then
        local base
        base=$(find_base_python) || die "no Python >= 3.10 found on PATH. Fix: install python3.11 (e.g. apt-get install -y python3 python3-venv) or set PYTHON=/path/to/python3."
        log "creating virtual environment $(relpath "$venv") with $base ($("$base" --version 2>&1))"
        "$base" -m venv "$venv" || die "could not create the venv at $venv. Fix: apt-get install -y python3-venv (Debian/Ubuntu), or set VENV_DIR to a writable path."
    fi
    local py="$venv/bin/python" stamp_file="$venv/.nsa-requirements.stamp" want have=""
    want=$(requirements_stamp "$req" "$py")
    [[ -f $stamp_file ]] && have=$(<"$stamp_file")
    if [[ $have == "$want" ]]; then
        log "requirements already installed ($(relpath "$req"), stamp matches)"
        return 0
    fi
    log "installing $(relpath "$req") into $(relpath "$venv") (first run takes a few minutes)"
    "$py" -m pip install --disable-pip-version-check -q -r "$req" \
        || die "pip install -r $(relpath "$req") failed (see the pip output above). Fix: check the network/proxy to the package index and free disk, then re-run."
    printf '%s\n' "$want" >"$stamp_file"
}

activate_venv() {  # put the venv first on PATH (no `source activate`: works the same in every shell)
    local venv; venv=$(venv_dir)
    [[ -x $venv/bin/python ]] || die "no virtual environment at $venv. Fix: bash scripts/prime_bootstrap.sh (or set VENV_DIR)."
    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
    hash -r
}

# ---------------------------------------------------------------------------------------------
# GPU detection (nvidia-smi)
# ---------------------------------------------------------------------------------------------

# detect_gpus: sets GPU_COUNT, GPU_VRAM_MIB (largest, MiB), GPU_MIN_VRAM_MIB, GPU_MODELS (e.g.
# "8x NVIDIA H100 80GB HBM3"), GPU_VRAM_LIST (MiB per GPU), GPU_DRIVER, GPU_CUDA (driver's CUDA).
# No nvidia-smi, or one that fails / finds no device, means GPU_COUNT=0. CUDA_VISIBLE_DEVICES with
# numeric indices restricts the view to those GPUs, as the trainer will see them.
detect_gpus() {
    GPU_COUNT=0 GPU_VRAM_MIB=0 GPU_MIN_VRAM_MIB=0 GPU_MODELS="none" GPU_VRAM_LIST="" GPU_DRIVER="n/a" GPU_CUDA="n/a"
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    local out
    out=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits 2>/dev/null) || return 0
    local visible=" ${CUDA_VISIBLE_DEVICES-} "
    local restrict=0
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} && ${CUDA_VISIBLE_DEVICES} =~ ^[0-9,\ ]*$ ]]; then
        restrict=1; visible=" ${CUDA_VISIBLE_DEVICES//,/ } "
    fi
    local idx name mem drv names=() mems=()
    while IFS=',' read -r idx name mem drv; do
        idx=${idx//[[:space:]]/}; mem=${mem//[[:space:]]/}; drv=${drv//[[:space:]]/}
        name=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' <<<"$name")
        [[ $idx =~ ^[0-9]+$ && $mem =~ ^[0-9]+$ ]] || continue
        if (( restrict )) && [[ $visible != *" $idx "* ]]; then continue; fi
        names+=("$name"); mems+=("$mem"); GPU_DRIVER=$drv
    done <<<"$out"
    GPU_COUNT=${#mems[@]}
    (( GPU_COUNT > 0 )) || { GPU_DRIVER="n/a"; return 0; }
    local m max=0 min=${mems[0]}
    for m in "${mems[@]}"; do (( m > max )) && max=$m; (( m < min )) && min=$m; done
    GPU_VRAM_MIB=$max GPU_MIN_VRAM_MIB=$min GPU_VRAM_LIST="${mems[*]}"
    GPU_MODELS=$(printf '%s\n' "${names[@]}" | sort | uniq -c | awk '{c=$1; $1=""; sub(/^ /,""); printf "%s%dx %s", (NR>1?", ":""), c, $0}')
    GPU_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n1)
    [[ -n $GPU_CUDA ]] || GPU_CUDA="unknown"
}

mib_to_gib() { awk -v m="$1" 'BEGIN { printf "%.1f", m / 1024 }'; }

# config_for_vram MIB -> config path for that VRAM tier (GiB thresholds: >= 75 -> 80g, >= 35 -> 40g,
# else 24g). nvidia-smi reports an "80 GB" card as 80 GiB (81920 MiB) or just under (81559 MiB for
# H100); the thresholds leave room on both sides.
config_for_vram() {
    local mib=$1 dir=${CONFIG_DIR:-configs}
    if (( mib >= 75 * 1024 )); then printf '%s\n' "$dir/m7c_125m_80g.yaml"
    elif (( mib >= 35 * 1024 )); then printf '%s\n' "$dir/m7c_125m_40g.yaml"
    else printf '%s\n' "$dir/m7c_125m_24g.yaml"
    fi
}

cpu_config() { printf '%s\n' "${CONFIG_DIR:-configs}/m7c_cpu.yaml"; }

# ---------------------------------------------------------------------------------------------
# Topology and NCCL
# ---------------------------------------------------------------------------------------------

# gpu_topology -> nvlink | pcie | unknown, from the GPU-to-GPU cells of `nvidia-smi topo -m`.
# Any NV# cell means NVLink/NVSwitch (NCCL routes over it; P2P must stay on). Only PIX/PXB/PHB/
# NODE/SYS cells means PCIe-only.
gpu_topology() {
    local out
    out=$(nvidia-smi topo -m 2>/dev/null) || { echo unknown; return; }
    out=$(sed -e 's/\x1b\[[0-9;]*m//g' <<<"$out")
    awk '
        /^[[:space:]]*GPU[0-9]+[[:space:]]/ && !header { for (i = 1; i <= NF; i++) if ($i ~ /^GPU[0-9]+$/) ng++; header = 1; next }
        /^GPU[0-9]+[[:space:]]/ {
            for (i = 2; i <= ng + 1 && i <= NF; i++) {
                if ($i ~ /^NV[0-9]+$/) nv = 1
                else if ($i ~ /^(PIX|PXB|PHB|NODE|SYS|SOC)$/) pci = 1
            }
        }
        END { if (nv) print "nvlink"; else if (pci) print "pcie"; else print "unknown" }
    ' <<<"$out"
}

has_infiniband() {  # true when the kernel exposes an InfiniBand/RoCE device
    local d=${NSA_IB_SYSFS:-/sys/class/infiniband}
    [[ -d $d ]] && compgen -G "$d/*" >/dev/null
}

NCCL_ENV_REPORT=()
_nccl_default() {  # _nccl_default NAME VALUE WHY: export unless the user already set NAME
    local name=$1 value=$2 why=$3
    if [[ -n ${!name+x} ]]; then
        NCCL_ENV_REPORT+=("$name=${!name} (kept: exported by you)")
    else
        export "$name=$value"
        NCCL_ENV_REPORT+=("$name=$value (set by runner: $why)")
    fi
}

# setup_nccl_env NPROC_TOTAL: the NCCL/torch.distributed environment for multi-process runs.
# Never overrides a variable the user exported; reports every choice in NCCL_ENV_REPORT.
setup_nccl_env() {
    local nproc=$1
    NCCL_ENV_REPORT=()
    NSA_TOPOLOGY="n/a"
    if (( nproc < 2 )); then
        NCCL_ENV_REPORT+=("(single process: NCCL not used, nothing set)")
        return 0
    fi
    _nccl_default NCCL_DEBUG WARN "NCCL warnings only"
    _nccl_default TORCH_NCCL_ASYNC_ERROR_HANDLING 1 "a failed/hung collective aborts the process instead of waiting forever"
    if has_infiniband; then
        NCCL_ENV_REPORT+=("NCCL_IB_DISABLE left unset (InfiniBand device present)")
    else
        _nccl_default NCCL_IB_DISABLE 1 "no InfiniBand device in ${NSA_IB_SYSFS:-/sys/class/infiniband}"
    fi
    NSA_TOPOLOGY=$(gpu_topology)
    case $NSA_TOPOLOGY in
        nvlink) if [[ -n ${NCCL_P2P_DISABLE+x} ]]; then
                    NCCL_ENV_REPORT+=("NCCL_P2P_DISABLE=$NCCL_P2P_DISABLE (kept: exported by you; topology is NVLink, P2P is normally left on)")
                else
                    NCCL_ENV_REPORT+=("NCCL_P2P_DISABLE left unset (NVLink topology: P2P stays on)")
                fi ;;
        pcie)   _nccl_default NCCL_P2P_DISABLE 1 "PCIe-only topology (nvidia-smi topo -m shows no NVLink)" ;;
        *)      NCCL_ENV_REPORT+=("NCCL_P2P_DISABLE left unset (topology unknown: nvidia-smi topo -m unreadable)") ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Configs, checkpoints, run folder, lock
# ---------------------------------------------------------------------------------------------

# yaml_train_out_dir CONFIG -> the `out_dir:` value of the config's `train:` section ("" if absent).
# A deliberately small reader (no Python needed, so DRY_RUN works before bootstrap).
yaml_train_out_dir() {
    awk '
        /^[^[:space:]#][^:]*:/ { section = $1; sub(/:.*/, "", section) }
        section == "train" && /^[[:space:]]+out_dir:/ {
            v = $0; sub(/^[^:]*:[[:space:]]*/, "", v); sub(/[[:space:]]+#.*$/, "", v); gsub(/["'\'']/, "", v); print v; exit
        }
    ' "$1"
}

# latest_checkpoint DIR -> path of the highest-step non-empty checkpoint_step{N}.pt ("" if none).
# The trainer validates it on load and falls back to the previous valid one if it is corrupt.
latest_checkpoint() {
    local dir=$1 f n best="" bestn=-1
    [[ -d $dir ]] || return 0
    for f in "$dir"/checkpoint_step*.pt; do
        [[ -f $f && -s $f ]] || continue
        n=${f##*/checkpoint_step}; n=${n%.pt}
        [[ $n =~ ^[0-9]+$ ]] || continue
        if (( 10#$n > bestn )); then bestn=$((10#$n)); best=$f; fi
    done
    [[ -n $best ]] && printf '%s\n' "$best"
    return 0
}

checkpoint_step() { local n=${1##*/checkpoint_step}; printf '%s\n' "${n%.pt}"; }

# new_run_dir ROOT -> creates ROOT/m7c_<YYYYmmdd-HHMMSS> (UTC; suffix -2, -3... on a same-second clash)
new_run_dir() {
    local root=$1 base d i=1
    base="$root/m7c_$(date -u +%Y%m%d-%H%M%S)"
    mkdir -p "$root"
    d=$base
    while ! mkdir "$d" 2>/dev/null; do i=$((i + 1)); d="$base-$i"; done
    printf '%s\n' "$d"
}

# acquire_lock OUT_DIR OWNER_LINE: one runner per output folder. Uses flock on OUT_DIR/.runner.lock
# (held by fd 9 for the life of the runner and inherited by the trainer, so an orphaned trainer still
# holds it); falls back to a pid file where flock is missing. Exits 5 naming the holder.
acquire_lock() {
    local dir=$1 owner=$2 lock="$1/.runner.lock"
    mkdir -p "$dir"
    if command -v flock >/dev/null 2>&1; then
        exec 9>>"$lock"
        if ! flock -n 9; then
            die "another runner is already using $(relpath "$dir"): $(tr '\n' ' ' <"$lock")— wait for it, stop it (kill -TERM <pid>), or set OUT_DIR to another folder. (If that pid is gone, an orphaned trainer still holds $(relpath "$lock"): find it with ps -ef | grep nsa.train.)" 5
        fi
        : >"$lock"
        printf '%s\n' "$owner" >&9
    else
        if [[ -f $lock.pid ]] && kill -0 "$(head -n1 "$lock.pid" 2>/dev/null)" 2>/dev/null; then
            die "another runner is already using $(relpath "$dir"): $(tail -n +2 "$lock.pid" | tr '\n' ' ')— stop it or set OUT_DIR to another folder." 5
        fi
        printf '%s\n%s\n' "$$" "$owner" >"$lock.pid"
        NSA_PIDFILE_LOCK="$lock.pid"
    fi
}

release_lock() {
    if [[ -n ${NSA_PIDFILE_LOCK:-} ]]; then rm -f "$NSA_PIDFILE_LOCK"; fi
    exec 9>&- 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# Running a child with its output logged, signals forwarded, exit code preserved
# ---------------------------------------------------------------------------------------------

NSA_CHILD_PID=""
NSA_STOP_REQUESTED=0

# _forward_stop SIGNAL: the runner got SIGINT/SIGTERM/SIGHUP -> ask the trainer (once) to stop
# cleanly; it finishes its step, saves a checkpoint and exits 143 ("preempted").
_forward_stop() {
    if (( NSA_STOP_REQUESTED == 0 )); then
        NSA_STOP_REQUESTED=1
        if [[ -n $NSA_CHILD_PID ]] && kill -0 "$NSA_CHILD_PID" 2>/dev/null; then
            warn "got SIG$1: asking the trainer (pid $NSA_CHILD_PID) to save a checkpoint and stop"
            kill -TERM "$NSA_CHILD_PID" 2>/dev/null || true
        else
            warn "got SIG$1: stopping"
        fi
    fi
}

install_signal_forwarding() {
    trap '_forward_stop INT' INT
    trap '_forward_stop TERM' TERM
    trap '_forward_stop HUP' HUP
}

# NSA_WATCHDOG_ARGS: when non-empty, run_logged starts `python -m nsa.watchdog --pid <child> ARGS...`
# next to the child (see prepare_watchdog) and stops it when the child exits.
NSA_WATCHDOG_ARGS=()

# run_logged LOGFILE CMD...: run CMD with stdout+stderr shown on the terminal and appended to LOGFILE
# through scripts/secrets_scan.py's redacting tee; returns CMD's own exit code. This is the tee
# pipeline `CMD 2>&1 | tee -a LOG; rc=${PIPESTATUS[0]}` rearranged so that (a) the trainer is this
# shell's direct child in its own session (setsid): Ctrl-C / a closed tmux pane reach it exactly
# once, as the SIGTERM forwarded above, and (b) the tee ignores those signals, so the trainer's
# last lines (the preemption save) are never lost to a broken pipe.
run_logged() {
    local logfile=$1; shift
    local tee_fd rc tee_pid
    exec {tee_fd}> >(trap '' INT TERM HUP; exec "$NSA_TEE_PYTHON" -u "$NSA_REPO_ROOT/scripts/secrets_scan.py" tee "$logfile")
    tee_pid=$!
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" >&"$tee_fd" 2>&1 </dev/null &
    else
        "$@" >&"$tee_fd" 2>&1 </dev/null &
    fi
    NSA_CHILD_PID=$!
    local watchdog_pid=""
    if (( ${#NSA_WATCHDOG_ARGS[@]} )); then
        (cd "$NSA_REPO_ROOT" && exec "$NSA_TEE_PYTHON" -m nsa.watchdog --pid "$NSA_CHILD_PID" "${NSA_WATCHDOG_ARGS[@]}" </dev/null 9>&-) &
        watchdog_pid=$!
    fi
    # a stop requested before the child existed still reaches it
    if (( NSA_STOP_REQUESTED )); then kill -TERM "$NSA_CHILD_PID" 2>/dev/null || true; fi
    while true; do
        wait "$NSA_CHILD_PID"; rc=$?
        kill -0 "$NSA_CHILD_PID" 2>/dev/null || break   # still alive: wait was interrupted by a trap
    done
    NSA_CHILD_PID=""
    if [[ -n $watchdog_pid ]]; then
        kill -TERM "$watchdog_pid" 2>/dev/null || true
        wait "$watchdog_pid" 2>/dev/null || true
    fi
    exec {tee_fd}>&-
    wait "$tee_pid" 2>/dev/null || true
    return "$rc"
}

# NSA_TEE_PYTHON: any Python 3 (stdlib only) for the redacting tee, the watchdog and alerts; the venv's once it exists.
NSA_TEE_PYTHON="${NSA_TEE_PYTHON:-$(command -v python3 || command -v python || echo python3)}"

# ---------------------------------------------------------------------------------------------
# Stall watchdog (nsa/watchdog.py)
# ---------------------------------------------------------------------------------------------

# prepare_watchdog WATCH_DIR STALL_DIR CSV: a clean watch dir for the next launch; the trainer finds it
# through NSA_WATCH_DIR (heartbeat, pid files, stack dumps). STALL_TIMEOUT_S=0 turns the watchdog off.
prepare_watchdog() {
    local watch=$1 stalls=$2 csv=$3
    rm -rf "$watch"; mkdir -p "$watch"
    export NSA_WATCH_DIR=$watch
    NSA_WATCHDOG_ARGS=()
    (( ${STALL_TIMEOUT_S:-1200} > 0 )) || return 0
    NSA_WATCHDOG_ARGS=(--watch-dir "$watch" --stall-dir "$stalls" --csv "$csv" --timeout "${STALL_TIMEOUT_S:-1200}"
                       --startup-timeout "${STALL_STARTUP_S:-1800}" --grace "${STALL_KILL_GRACE_S:-60}"
                       --poll "${STALL_POLL_S:-2}")
    [[ -n $NSA_LOG_FILE ]] && NSA_WATCHDOG_ARGS+=(--log "$NSA_LOG_FILE")
    return 0
}

# stall_summary -> one line about the stall the watchdog recorded for the last launch (fails if none)
stall_summary() {
    local f="${NSA_WATCH_DIR:-/nonexistent}/stalled.json"
    [[ -f $f ]] || return 1
    "$NSA_TEE_PYTHON" - "$f" <<'EOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
print(f"no progress for {d.get('quiet_s')}s (limit {d.get('limit_s')}s) in phase {d.get('phase')} at step "
      f"{d.get('step')}; stacks of {d.get('ranks_dumped')} rank(s) in {os.path.relpath(d.get('stack_file', '?'), os.environ.get('NSA_REPO_ROOT', '.'))}")
EOF
}

# ---------------------------------------------------------------------------------------------
# Alerts (nsa/alerts.py): fire-and-forget, so a slow or dead webhook never delays the run
# ---------------------------------------------------------------------------------------------

NSA_ALERT_PIDS=()
# alert EVENT MESSAGE: POST to $ALERT_WEBHOOK_URL in a detached process (no-op when unset). The URL
# stays in the environment: it is never on a command line, in run.info or in a log.
alert() {
    [[ -n ${ALERT_WEBHOOK_URL:-} ]] || return 0
    local cmd=("$NSA_TEE_PYTHON" -m nsa.alerts "$1" "$2" --run "${NSA_RUN_ID:-}")
    [[ -n $NSA_LOG_FILE ]] && cmd+=(--log "$NSA_LOG_FILE")
    if command -v setsid >/dev/null 2>&1; then cmd=(setsid "${cmd[@]}"); fi
    # fd 9 is the runner lock: a detached sender must not keep holding it after the runner exits
    (cd "$NSA_REPO_ROOT" && exec "${cmd[@]}" </dev/null >/dev/null 2>&1 9>&-) &   # failures go to --log
    NSA_ALERT_PIDS+=("$!")
    log "alert: $1"
}

# wait_alerts SECONDS: give alerts still in flight at most SECONDS to be delivered (before exiting)
wait_alerts() {
    local deadline=$((SECONDS + $1)) p
    for p in "${NSA_ALERT_PIDS[@]}"; do
        while kill -0 "$p" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    done
    return 0
}

# run_summary OUT_DIR -> "step 500/500, best val 3.2100 (step 450), 262M tokens, 1h02m, $12.34" from metrics.json
run_summary() {
    "$NSA_TEE_PYTHON" - "$1/metrics.json" <<'EOF' 2>/dev/null || echo "no metrics.json"
import json, sys
m = json.load(open(sys.argv[1]))
parts = [f"step {m.get('step')}" + (f"/{m['total_steps']}" if m.get("total_steps") else "")]
b = m.get("best_val") or {}
if b.get("loss") is not None:
    parts.append(f"best val {b['loss']:.4f} (step {b.get('step')})")
if m.get("tokens_seen"):
    t = m["tokens_seen"]
    parts.append(f"{t / 1e9:.2f}B tokens" if t >= 1e9 else f"{t / 1e6:.1f}M tokens" if t >= 1e5 else f"{t:,} tokens")
if m.get("elapsed_s") is not None:
    h, r = divmod(int(m["elapsed_s"]), 3600)
    parts.append(f"{h}h{r // 60:02d}m")
if m.get("cost_usd") is not None:
    parts.append(f"${m['cost_usd']:.2f}")
print(", ".join(parts))
EOF
}

# ---------------------------------------------------------------------------------------------
# Exit codes (documented in RUNBOOK.md "Exit codes")
# ---------------------------------------------------------------------------------------------
NSA_EXIT_OK=0
NSA_EXIT_CRASH=1
NSA_EXIT_USER=2
NSA_EXIT_DIVERGED=3
NSA_EXIT_SMOKE=4
NSA_EXIT_LOCKED=5
NSA_EXIT_SECRET=6
NSA_EXIT_PREFLIGHT=7
NSA_EXIT_STALLED=8
NSA_EXIT_PREEMPTED=143

describe_exit() {
    case $1 in
        0) echo "completed (or early-stopped)" ;;
        1) echo "crashed" ;;
        2) echo "user/config error (not retried: fix the input)" ;;
        3) echo "diverged (non-finite loss/grad; last good checkpoint kept)" ;;
        4) echo "smoke gate failed" ;;
        5) echo "output folder locked by another runner" ;;
        7) echo "pre-flight failed (nothing trained: fix what it reported)" ;;
        8) echo "stalled (the watchdog stopped a hung trainer; no restart left)" ;;
        137) echo "killed (SIGKILL: out of host memory? check dmesg)" ;;
        143) echo "preempted / stopped by a signal (checkpoint saved; re-run to resume)" ;;
        *) echo "crashed with exit code $1" ;;
    esac
}
