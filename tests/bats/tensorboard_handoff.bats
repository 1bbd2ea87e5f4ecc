#!/usr/bin/env bats
# scripts/run_tensorboard.sh (binds localhost, prints the ssh -L line) and scripts/handoff.sh (bundle
# contents, checksums, the run report in report/, stall dumps, --no-checkpoint, MISSING.txt, refusal of
# planted secrets).

load helpers

setup() {
    setup_sandbox
    ln -s "$FAKES/tensorboard" "$T/venv/bin/tensorboard"
    export FAKE_TB_LOG="$T/tb.log"
}

@test "TensorBoard binds 127.0.0.1 on the default logdir/port and prints the ssh -L line" {
    unset SSH_CONNECTION
    run bash "$REPO/scripts/run_tensorboard.sh"
    [ "$status" -eq 0 ]
    grep -qx "tensorboard --logdir artifacts/m7c_125m/tb --host 127.0.0.1 --port 6006" "$FAKE_TB_LOG"
    [[ $output == *"ssh -N -L 6006:127.0.0.1:6006 "*@* ]]
}

@test "TensorBoard: custom logdir/port, and the exact ssh line from SSH_CONNECTION" {
    mkdir -p "$T/tb"
    SSH_CONNECTION="198.51.100.7 51234 203.0.113.9 2222" USER=alice run bash "$REPO/scripts/run_tensorboard.sh" "$T/tb" 6123
    [ "$status" -eq 0 ]
    grep -qx "tensorboard --logdir $T/tb --host 127.0.0.1 --port 6123" "$FAKE_TB_LOG"
    [[ $output == *"ssh -N -L 6123:127.0.0.1:6123 -p 2222 alice@203.0.113.9"* ]]
    [[ $output == *"no event files"* ]]
    run bash "$REPO/scripts/run_tensorboard.sh" "$T/tb" notaport
    [ "$status" -eq 2 ]
}

make_run() {  # a complete run through the runner with the fake trainer
    run bash "$REPO/scripts/train_m7c_prime.sh"
    [ "$status" -eq 0 ]
}

@test "handoff bundles run.info, logs, CSVs, metrics, the run report, latest checkpoint, env info and SHA256SUMS" {
    make_run
    # a stall dump as the watchdog writes them (the fake runner never stalls)
    mkdir -p "$(run_dir)/stalls" && printf 'Thread 0x1 (most recent call first):\n' >"$(run_dir)/stalls/stall_20260101-000000.txt"
    echo '{"choices": {}}' >"$OUT_DIR/kernel_tuning.json"   # what a GPU run's kernel tuning writes
    run bash "$REPO/scripts/handoff.sh" --out "$T/bundle.tar.gz"
    [ "$status" -eq 0 ]
    [ -s "$T/bundle.tar.gz" ]
    mkdir "$T/x" && tar -xzf "$T/bundle.tar.gz" -C "$T/x"
    d="$T/x/handoff_$(basename "$(run_dir)")"
    for f in run.info smoke.log train.log runner.log training.csv val.csv metrics.json env.txt \
             report/report.md report/loss.png report/val_loss.png report/throughput.png \
             stalls/stall_20260101-000000.txt SHA256SUMS checkpoints/checkpoint_step20.pt final-model.json \
             kernel_tuning.json; do
        [ -s "$d/$f" ] || { echo "missing $f"; ls -R "$T/x"; false; }
    done
    ! grep -q -e report "$d/MISSING.txt"      # (the fake trainer writes no config.yaml)
    [ "$(ls "$d/checkpoints")" = "checkpoint_step20.pt" ]     # only the latest
    (cd "$d" && sha256sum -c --quiet SHA256SUMS)
    grep -q ' ./report/report.md$' "$d/SHA256SUMS"
    for png in report/loss.png report/val_loss.png report/throughput.png; do
        head -c 8 "$d/$png" | od -An -c | grep -q 'P   N   G' || { echo "$png is not a PNG"; false; }
    done
    # the report reads the fake trainer's minimal files (step,loss,lr,toks_per_s; status/step/tokens_seen)
    grep -q "^# Run report: $(basename "$(run_dir)")" "$d/report/report.md"
    grep -qF -- '- **Status:** completed' "$d/report/report.md"
    grep -qF -- '- **Runner exit code:** 0 (' "$d/report/report.md"
    grep -qF -- '- **Final training loss:** 3.3333 at step 20 (first: 9.0909 at step 1; 20 logged rows)' "$d/report/report.md"
    grep -qF -- '- **Best validation loss:** 3.3333 (ppl 28.03) at step 20' "$d/report/report.md"
    grep -qF -- '- **Tokens seen:** 81,920' "$d/report/report.md"
    grep -qF -- '- **Tokens/s:** median 1,234, last 1,234' "$d/report/report.md"
    grep -qF -- '`stalls/stall_20260101-000000.txt`' "$d/report/report.md"
    grep -q "^git_commit: " "$d/env.txt"
    grep -q "^pip freeze:" "$d/env.txt"
    grep -qx "  fake-package==1.0" "$d/env.txt"         # (the fake venv's freeze), indented under it
    grep -qx "torch: 2.99.0+bats.stub cuda: None" "$d/env.txt"
}

@test "handoff without training.csv: no report, MISSING.txt says why; a header-only CSV is not an error either" {
    make_run
    rm "$OUT_DIR/training.csv"
    run bash "$REPO/scripts/handoff.sh" --no-checkpoint --out "$T/b1.tar.gz"
    [ "$status" -eq 0 ]
    mkdir "$T/b1" && tar -xzf "$T/b1.tar.gz" -C "$T/b1"
    d="$T/b1/handoff_$(basename "$(run_dir)")"
    [ ! -e "$d/report" ]
    grep -q '^report/ (report.md and PNGs: no training.csv)$' "$d/MISSING.txt"
    grep -q 'training.csv$' "$d/MISSING.txt"
    ! grep -q kernel_tuning "$d/MISSING.txt"   # CPU runs write none: not "missing"
    [[ $output == *"not in the bundle (missing)"*"report/"* ]]
    echo "step,loss,lr,toks_per_s" >"$OUT_DIR/training.csv"
    run bash "$REPO/scripts/handoff.sh" --no-checkpoint --out "$T/b2.tar.gz"
    [ "$status" -eq 0 ]
    tar -xzf "$T/b2.tar.gz" -O "handoff_$(basename "$(run_dir)")/MISSING.txt" | grep -q 'training.csv has no rows yet'
}

@test "handoff: a report that cannot be rendered is a clear error, no bundle" {
    make_run
    printf 'step,loss\n1,2.5\n' >"$OUT_DIR/training.csv"
    printf '#!/bin/sh\necho "Traceback: matplotlib broken" >&2; exit 1\n' >"$T/bin/python3"   # every helper python fails
    run bash "$REPO/scripts/handoff.sh" --no-checkpoint --out "$T/b.tar.gz"
    [ "$status" -eq 2 ]
    [[ $output == *"could not render the run report"*"Fix:"* ]]
    [ ! -e "$T/b.tar.gz" ]
}

@test "handoff --no-checkpoint leaves the checkpoint out; the default run folder is the latest" {
    make_run
    run bash "$REPO/scripts/handoff.sh" --no-checkpoint --out "$T/b.tar.gz"
    [ "$status" -eq 0 ]
    ! tar -tzf "$T/b.tar.gz" | grep -q '\.pt$'
    tar -tzf "$T/b.tar.gz" | grep -q "handoff_$(basename "$(run_dir)")/run.info"
}

@test "handoff refuses a file holding a secret, and never bundles an environment secret" {
    # fake secrets, assembled at run time so no token-shaped literal is committed
    export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567 HF_TOKEN="hf_ZyXwVuTsRqPoNm""LkJiHgFeDcBa9876543210"
    make_run
    # nothing planted: the bundle is built and holds neither value
    run bash "$REPO/scripts/handoff.sh" --out "$T/ok.tar.gz"
    [ "$status" -eq 0 ]
    mkdir "$T/ok" && tar -xzf "$T/ok.tar.gz" -C "$T/ok"
    ! grep -rq -e "$WANDB_API_KEY" -e "$HF_TOKEN" "$T/ok"
    # planted into a run output: refused, no bundle, the value is not echoed
    echo "\"note\": \"$HF_TOKEN\"" >>"$OUT_DIR/metrics.json"
    run bash "$REPO/scripts/handoff.sh" --out "$T/bad.tar.gz"
    [ "$status" -eq 6 ]
    [[ $output == *"refusing"* && $output == *"metrics.json:2"* ]]
    [[ $output != *"$HF_TOKEN"* ]]
    [ ! -e "$T/bad.tar.gz" ]
    # a webhook planted in the train log is refused too
    sed -i '$d' "$OUT_DIR/metrics.json"
    echo "alert to https://discord.com/api/webhooks/123/abcDEF" >>"$(run_dir)/train.log"
    run bash "$REPO/scripts/handoff.sh" --out "$T/bad2.tar.gz"
    [ "$status" -eq 6 ]
    [[ $output == *"train.log"*"discord-webhook"* ]]
}

@test "handoff: a missing run folder is a clear error" {
    run bash "$REPO/scripts/handoff.sh"
    [ "$status" -eq 2 ]
    [[ $output == *"no run folder under"* ]]
    run bash "$REPO/scripts/handoff.sh" "$T/nope"
    [ "$status" -eq 2 ]
    [[ $output == *"does not exist"* ]]
}
