#!/usr/bin/env bash
# TensorBoard on the training node, reachable only through an SSH tunnel (binds 127.0.0.1).
#
#   bash scripts/run_tensorboard.sh [LOGDIR] [PORT]      # defaults: artifacts/m7c_125m/tb 6006
#   then on your laptop: the `ssh -N -L ...` line printed below, and open http://localhost:PORT
set -euo pipefail
NSA_LOG_TAG=tensorboard
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NSA_REPO_ROOT"

logdir=${1:-artifacts/m7c_125m/tb}
port=${2:-6006}
[[ $port =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "port '$port' is not a TCP port number. Fix: e.g. bash scripts/run_tensorboard.sh $logdir 6007"
activate_venv
command -v tensorboard >/dev/null 2>&1 || die "tensorboard is not installed in $(relpath "$(venv_dir)"). Fix: bash scripts/prime_bootstrap.sh"
if ! python - "$port" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
PY
then
    die "port $port on 127.0.0.1 is already in use (another TensorBoard?). Fix: bash scripts/run_tensorboard.sh $logdir $((port + 1))"
fi
if ! find "$logdir" -name '*tfevents*' -print -quit 2>/dev/null | grep -q .; then
    warn "no event files in $logdir yet; TensorBoard will show them once training writes them"
fi

if [[ -n ${SSH_CONNECTION:-} ]]; then
    read -r _ _ server_ip server_port <<<"$SSH_CONNECTION"
    target="${USER:-$(id -un)}@$server_ip"
    (( server_port != 22 )) && target="-p $server_port $target"
else
    target="${USER:-$(id -un)}@${HOSTNAME:-$(uname -n)}"
fi
log "TensorBoard for $logdir on http://127.0.0.1:$port (this node only)"
log "on your laptop run:  ssh -N -L $port:127.0.0.1:$port $target"
log "then open:           http://localhost:$port"
exec tensorboard --logdir "$logdir" --host 127.0.0.1 --port "$port"
