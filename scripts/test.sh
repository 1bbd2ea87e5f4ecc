#!/usr/bin/env bash
# The project's one test command: bats suites (tests/bats/) then pytest on all of tests/.
#
#   bash scripts/test.sh [extra pytest args, e.g. -x -k "not e2e", or test paths instead of tests/]
#
# pytest runs in two phases (pytest-xdist): most tests spread over the cores (TEST_WORKERS, default one per
# core), then the serial ones (tests/conftest.py SERIAL_FILES). With -m, -n or -p in the arguments, or
# without xdist, it is one plain pytest run.
#
# On a fresh machine it first creates .venv and installs requirements-cpu.txt (skipped when the
# requirements stamp matches: a re-run starts testing within seconds), and installs bats-core if it
# is missing (Debian apt as root, else npm into .venv/tools). Exits non-zero if either suite fails.
# VENV_DIR overrides the venv location.
set -euo pipefail
NSA_LOG_TAG="test"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NSA_REPO_ROOT"
t_start=$SECONDS

ensure_venv requirements-cpu.txt

ensure_bats() {
    local tools; tools="$(venv_dir)/tools"
    # npm links bin/bats into node_modules/.bin, except with some registry mirrors: use the package's bin/
    if [[ -x $tools/node_modules/bats/bin/bats ]]; then export PATH="$tools/node_modules/bats/bin:$PATH"; fi
    command -v bats >/dev/null 2>&1 && return 0
    local sudo=""
    [[ $(id -u) -eq 0 ]] || { sudo -n true 2>/dev/null && sudo="sudo -n"; }
    if command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) -eq 0 ]] || [[ -n $sudo ]]; }; then
        log "installing bats-core from Debian (apt-get install bats)"
        if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bats >/dev/null 2>&1 \
           || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bats >/dev/null; }; then
            command -v bats >/dev/null 2>&1 && return 0
        fi
        warn "apt-get could not install bats; trying npm"
    fi
    if command -v npm >/dev/null 2>&1; then
        log "installing bats-core from npm into $(relpath "$tools")"
        mkdir -p "$tools"
        npm install --prefix "$tools" --no-audit --no-fund --silent bats@1.11.0 >/dev/null \
            || die "npm install bats failed. Fix: apt-get install -y bats (Debian/Ubuntu) or npm install -g bats, then re-run."
        export PATH="$tools/node_modules/bats/bin:$PATH"
        command -v bats >/dev/null 2>&1 && return 0
    fi
    die "bats-core is not installed and neither apt-get (as root) nor npm is available. Fix: install bats-core (https://bats-core.readthedocs.io) and re-run."
}
ensure_bats
log "bats: $(bats --version); python: $("$(venv_dir)/bin/python" --version)"

export NSA_REAL_VENV; NSA_REAL_VENV=$(venv_dir)
t0=$SECONDS
bats_rc=0
bats_flags=()
bats --help 2>&1 | grep -q -- --print-output-on-failure && bats_flags+=(--print-output-on-failure)
bats "${bats_flags[@]}" tests/bats || bats_rc=$?
bats_s=$(( SECONDS - t0 ))

t0=$SECONDS
py_rc=0
py="$(venv_dir)/bin/python"
# pytest on all of tests/, unless the arguments name test paths themselves
pytest_args=("$@") has_path=0 own_selection=0
for a in "$@"; do
    [[ $a != -* && -e $a ]] && has_path=1
    [[ $a == -m || $a == -n* || $a == -p ]] && own_selection=1
done
(( has_path )) || pytest_args=(tests "$@")
if (( own_selection )) || ! "$py" -c "import xdist" 2>/dev/null; then
    "$py" -m pytest "${pytest_args[@]}" || py_rc=$?
else
    # Two phases (tests/conftest.py SERIAL_FILES): the unit and kernel tests spread over the cores, then the
    # multi-threaded, multi-process and timing tests one at a time. Exit 5 = that phase selected no tests.
    log "pytest phase 1/2: tests spread over ${TEST_WORKERS:-auto} workers"
    rc1=0; "$py" -m pytest -n "${TEST_WORKERS:-auto}" --dist loadfile -m "not serial" "${pytest_args[@]}" || rc1=$?
    log "pytest phase 2/2: the serial tests (trainer processes, multi-threaded, wall-clock checks)"
    rc2=0; "$py" -m pytest -m serial "${pytest_args[@]}" || rc2=$?
    if (( rc1 == 5 && rc2 == 5 )); then py_rc=5
    elif (( rc1 != 0 && rc1 != 5 )); then py_rc=$rc1
    elif (( rc2 != 0 && rc2 != 5 )); then py_rc=$rc2
    fi
fi
py_s=$(( SECONDS - t0 ))

verdict() { (( $1 == 0 )) && echo PASS || echo "FAIL (exit $1)"; }
overall=OK; (( bats_rc == 0 && py_rc == 0 )) || overall=FAILED
echo "test.sh summary: bats $(verdict "$bats_rc") in ${bats_s}s | pytest $(verdict "$py_rc") in ${py_s}s | total $(( SECONDS - t_start ))s -> $overall"
[[ $overall == OK ]]
