#!/usr/bin/env bats
# README.md / RUNBOOK.md stay true to the scripts: every script they name exists, every runner
# setting in the RUNBOOK table is read by the runner, and every setting the runner reads is documented.

load helpers

@test "every scripts/... path named in README.md and RUNBOOK.md exists" {
    cd "$REPO"
    paths=$(grep -ohE 'scripts/[A-Za-z0-9_./-]+\.(sh|py)' README.md RUNBOOK.md | sort -u)
    [ -n "$paths" ]
    for p in $paths; do [ -f "$p" ] || { echo "missing $p"; false; }; done
    for c in configs/m7c_125m_24g.yaml configs/m7c_125m_40g.yaml configs/m7c_125m_80g.yaml configs/m7c_cpu.yaml configs/smoke.yaml; do
        [ -f "$c" ] || { echo "missing $c"; false; }
    done
}

@test "the README names the two commands and the RUNBOOK has every required section" {
    cd "$REPO"
    grep -q '^bash scripts/train_m7c_prime.sh' README.md
    grep -q '^bash scripts/test.sh' README.md
    grep -q '^## Layout' README.md
    for s in "tmux" "Bootstrap" "Start" "Runner settings" "Health checks" "TensorBoard over SSH" "Resume" \
             "Troubleshooting" "Cost and ETA" "Handoff checklist"; do
        grep -qE "^## ([0-9]+\. )?.*$s" RUNBOOK.md || { echo "RUNBOOK lacks section: $s"; false; }
    done
    for t in "Out of memory" "NCCL hangs" "Slow data" "Disconnects"; do grep -q "\*\*$t" RUNBOOK.md || { echo "no $t"; false; }; done
}

@test "runner settings: documented <=> read by the runner" {
    cd "$REPO"
    documented=$(sed -n '/^## Runner settings/,/^## Exit codes/p' RUNBOOK.md | grep -oE '^\| `[A-Z_]+`' | tr -d '|` ' | sort -u)
    read_by_runner=$(grep -ohE '\$\{[A-Z_]+:-' scripts/train_m7c_prime.sh scripts/lib.sh | sed 's/^\${//; s/:-$//' | sort -u)
    for v in $documented; do
        grep -qE "\\\$\{$v(:-|\}|\+)|\\\$$v\b|\[\[ -n \\\$\{$v" scripts/train_m7c_prime.sh scripts/lib.sh || { echo "documented but unused: $v"; false; }
    done
    for v in $read_by_runner; do
        case $v in NSA_*|USER|HOSTNAME|PYTHON|CUDA_VISIBLE_DEVICES) continue ;; esac
        grep -qx "$v" <<<"$documented" || { echo "read by the runner but not documented: $v"; false; }
    done
}

@test "--help prints the settings table" {
    run bash "$REPO/scripts/train_m7c_prime.sh" --help
    [ "$status" -eq 0 ]
    [[ $output == *"| \`NGPU\`"* && $output == *"usage:"* ]]
}
