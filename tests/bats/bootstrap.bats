#!/usr/bin/env bats
# scripts/prime_bootstrap.sh: idempotent re-run (requirements stamp), disk check, GPU verification
# refusing a CPU-only torch on a GPU node. The venv is a fake whose python hands off to the real one.

load helpers

setup() {
    setup_sandbox
    [[ -x $T/bin/python3 ]] || skip "no real venv to verify against"
    # stamps as ensure_venv computes them, for both requirement files
    source "$REPO/scripts/lib.sh"
    requirements_stamp "$REPO/requirements-cpu.txt" "$T/venv/bin/python" >"$T/cpu.stamp"
    requirements_stamp "$REPO/requirements-gpu.txt" "$T/venv/bin/python" >"$T/gpu.stamp"
}

@test "a re-run with unchanged requirements skips pip and only verifies" {
    cp "$T/cpu.stamp" "$T/venv/.nsa-requirements.stamp"
    run bash "$REPO/scripts/prime_bootstrap.sh"
    [ "$status" -eq 0 ]
    [[ $output == *"requirements already installed (requirements-cpu.txt, stamp matches)"* ]]
    [[ $output == *"device       : CPU only"* ]]
    [[ $output == *"bootstrap OK"* ]]
}

@test "too little disk stops with the numbers and the fix" {
    MIN_FREE_GB=999999 run bash "$REPO/scripts/prime_bootstrap.sh"
    [ "$status" -eq 2 ]
    [[ $output == *"GiB free on the disk holding"*"need 999999 GiB"* ]]
}

@test "a GPU node picks requirements-gpu.txt and refuses a CPU-only torch" {
    cp "$T/gpu.stamp" "$T/venv/.nsa-requirements.stamp"
    FAKE_GPU_COUNT=2 FAKE_GPU_NAME="NVIDIA A100-SXM4-40GB" FAKE_GPU_VRAM_GB=40 MIN_FREE_GB=0 run bash "$REPO/scripts/prime_bootstrap.sh"
    [ "$status" -eq 1 ]
    [[ $output == *"gpus: 2x NVIDIA A100-SXM4-40GB; VRAM per GPU (GiB): 40.0 40.0 ; driver 550.54.15; CUDA (driver) 12.4"* ]]
    [[ $output == *"requirements-gpu.txt, stamp matches"* ]]
    [[ $output == *"is a CPU-only build"* ]]
    [[ $output == *"environment verification failed"* ]]
}

@test "a changed requirements file triggers pip again (stamp mismatch)" {
    echo "stale" >"$T/venv/.nsa-requirements.stamp"
    printf 'pip\n' >"$T/req.txt"   # a requirement pip already satisfies: no network needed
    REQUIREMENTS="$T/req.txt" SKIP_VERIFY=1 run bash "$REPO/scripts/prime_bootstrap.sh"
    [ "$status" -eq 0 ]
    [[ $output == *"installing $T/req.txt"* ]]
    [ "$(cat "$T/venv/.nsa-requirements.stamp")" != stale ]
    REQUIREMENTS="$T/req.txt" SKIP_VERIFY=1 run bash "$REPO/scripts/prime_bootstrap.sh"
    [[ $output == *"already installed"* ]]
}
