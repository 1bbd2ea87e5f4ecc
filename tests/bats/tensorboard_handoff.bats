#!/usr/bin/env bats
# scripts/run_tensorboard.sh (binds localhost, prints the ssh -L line) and scripts/handoff.sh (bundle
# contents, checksums, loss-curve PNG, --no-checkpoint, refusal of planted secrets).

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

@test "handoff bundles run.info, logs, CSVs, metrics, PNG, latest checkpoint, env info and SHA256SUMS" {
    make_run
    run bash "$REPO/scripts/handoff.sh" --out "$T/bundle.tar.gz"
    [ "$status" -eq 0 ]
    [ -s "$T/bundle.tar.gz" ]
    mkdir "$T/x" && tar -xzf "$T/bundle.tar.gz" -C "$T/x"
    d="$T/x/handoff_$(basename "$(run_dir)")"
    for f in run.info smoke.log train.log runner.log training.csv val.csv metrics.json loss_curve.png env.txt \
             SHA256SUMS checkpoints/checkpoint_step20.pt final-model.json; do
        [ -s "$d/$f" ] || { echo "missing $f"; ls -R "$T/x"; false; }
    done
    [ "$(ls "$d/checkpoints")" = "checkpoint_step20.pt" ]     # only the latest
    (cd "$d" && sha256sum -c --quiet SHA256SUMS)
    head -c 8 "$d/loss_curve.png" | od -An -c | grep -q 'P   N   G'
    grep -q "^git_commit: " "$d/env.txt"
    grep -q "^pip freeze:" "$d/env.txt"
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
