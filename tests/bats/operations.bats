#!/usr/bin/env bats
# Operating a paid run through scripts/train_m7c_prime.sh against the fake trainer: the pre-flight gate,
# the stall watchdog (real nsa/watchdog.py) and webhook alerts (real nsa/alerts.py, local HTTP server).

load helpers

setup() {
    setup_sandbox
    export FAKE_PREFLIGHT_LOG="$T/preflight_calls.log" STALL_POLL_S=0.2
    WEBHOOK_PID=""
}

teardown() {
    [[ -n $WEBHOOK_PID ]] && kill "$WEBHOOK_PID" 2>/dev/null || true
}

# start_webhook MODE: a local webhook; sets ALERT_WEBHOOK_URL (with a secret-looking path) and HOOK_LOG
start_webhook() {
    HOOK_LOG="$T/webhook.jsonl"; : >"$HOOK_LOG"; rm -f "$T/webhook.port"
    python3 "$BATS_TEST_DIRNAME/webhook_server.py" "$1" "$T/webhook.port" "$HOOK_LOG" &
    WEBHOOK_PID=$!
    for _ in $(seq 50); do [[ -s $T/webhook.port ]] && break; sleep 0.1; done
    # the secret part of a Slack hook URL is its path; assembled here so no hook-shaped literal is committed
    HOOK_SECRET="S3cr3t$(printf 'x%.0s' {1..20})"
    export ALERT_WEBHOOK_URL="http://127.0.0.1:$(cat "$T/webhook.port")/services/T0/B0/$HOOK_SECRET"
}

# events -> the event names received, one per line, in arrival order
events() { python3 -c 'import json,sys; [print(json.loads(l)["body"]["event"]) for l in open(sys.argv[1]) if l.strip()]' "$HOOK_LOG"; }

# wait_events N: wait (up to 15 s) until N alerts have arrived
wait_events() { for _ in $(seq 150); do (( $(wc -l <"$HOOK_LOG") >= $1 )) && return 0; sleep 0.1; done; return 0; }

# ------------------------------------------------------------------------------------- pre-flight

@test "pre-flight runs before the smoke gate with the training arguments and the world size" {
    export FAKE_GPU_COUNT=2 STEPS=30
    run runner train.lr=3e-4
    [ "$status" -eq 0 ]
    run cat "$FAKE_PREFLIGHT_LOG"
    [ "${#lines[@]}" -eq 1 ]
    [[ ${lines[0]} == "preflight --config $CONFIG_DIR/m7c_125m_80g.yaml --resume auto --out-dir $OUT_DIR --steps 30 train.lr=3e-4 --world-size 2 --expect-gpus 2" ]]
    [ "$(info_value preflight_result)" = passed ]
    grep -q "all checks passed" "$(run_dir)/preflight.log"
}

@test "a failed pre-flight stops the run before any training: exit 7, nothing launched" {
    export FAKE_GPU_COUNT=1 FAKE_PREFLIGHT_RC=2
    run runner
    [ "$status" -eq 7 ]
    [[ $output == *"pre-flight failed"* && $output == *"preflight.log"* && $output == *"Nothing was trained"* ]]
    [ ! -s "$FAKE_TRAIN_LOG" ]                      # neither smoke nor training ran
    [[ $(info_value preflight_result) == "FAILED (exit 2): [preflight] FAIL disk"* ]]
    [[ $(info_value exit_code) == "7 "* ]]
    [ ! -e "$OUT_DIR/training.csv" ]
}

@test "SKIP_PREFLIGHT=1 skips it and says so" {
    export FAKE_GPU_COUNT=1 FAKE_PREFLIGHT_RC=2 SKIP_PREFLIGHT=1
    run runner
    [ "$status" -eq 0 ]
    [ ! -e "$FAKE_PREFLIGHT_LOG" ]
    [[ $(info_value preflight_result) == skipped* ]]
}

# ------------------------------------------------------------------------------------------ watchdog

@test "a hung trainer is caught within STALL_TIMEOUT_S, its stacks are dumped, and the supervisor resumes it" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_HANG_AT=15 STALL_TIMEOUT_S=2 STALL_KILL_GRACE_S=1 FAKE_TRAIN_STEPS=20
    start=$SECONDS
    run runner
    [ "$status" -eq 0 ]
    (( SECONDS - start < 30 ))
    # two launches: the hung one (killed: it ignores SIGTERM) and the resumed one that finished
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 2 ]
    grep -q "fake trainer: hanging at step 15" "$(run_dir)/train.log"
    grep -q "fake trainer: resumed from step 10" "$(run_dir)/train.log"
    # the stall report holds rank 0's stack, and says how long it was quiet
    report=$(ls "$(run_dir)"/stalls/stall_*.txt)
    grep -q "fake stack: rank 0 stuck in fake_all_reduce at step 15" "$report"
    grep -q "===== rank 0" "$report"
    quiet=$(sed -n 's/.*no heartbeat\/training.csv progress for \([0-9]*\)s (limit 2s).*/\1/p' "$report")
    [ -n "$quiet" ] && (( quiet <= 4 ))
    [[ $(info_value stall_1) == "attempt 1: no progress for"*"stall_"* ]]
    [[ $(info_value restart_1) == "after a stall"* ]]
    grep -q "SIGKILL" "$(run_dir)/runner.log"
    # the run ends at the same final step as an uninterrupted one
    [ "$(tail -n1 "$OUT_DIR/training.csv" | cut -d, -f1)" = 20 ]
    [ "$(cut -d, -f1 "$OUT_DIR/training.csv" | tail -n +2 | sort -n | uniq -d)" = "" ]
}

@test "a stall without the supervisor ends the run with exit 8 and the stack report" {
    export NGPU=0 SKIP_SMOKE=1 FAKE_TRAIN_HANG_AT=5 STALL_TIMEOUT_S=1 STALL_KILL_GRACE_S=1
    run runner
    [ "$status" -eq 8 ]
    [[ $output == *"stalled"*"supervisor off"* ]]
    ls "$(run_dir)"/stalls/stall_*.txt
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 1 ]
}

@test "STALL_TIMEOUT_S=0 turns the watchdog off; bad values fail clearly" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 STALL_TIMEOUT_S=0
    run runner
    [ "$status" -eq 0 ]
    grep -q "^watchdog: *off" "$(run_dir)/run.info"
    ! grep -q "watching pid" "$(run_dir)/runner.log"
    STALL_TIMEOUT_S=soon run runner
    [ "$status" -eq 2 ]
    [[ $output == *"STALL_TIMEOUT_S='soon' is not a non-negative integer"* ]]
}

# --------------------------------------------------------------------------------------------- alerts

@test "alerts: started, crashed (restarting) and completed arrive in order, with no secret in them" {
    start_webhook ok
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_RCS=1,0 GPU_HOURLY_USD=2.5
    run runner
    [ "$status" -eq 0 ]
    wait_events 3
    run events
    [ "${lines[*]}" = "started crashed completed" ]
    grep -q '"text": ":rocket: \[nsa\] started m7c_' "$HOOK_LOG"
    grep -q 'restarting from the newest checkpoint (1/5)' "$HOOK_LOG"
    # the URL (or its secret path) is in no payload and no log
    ! grep -q "$HOOK_SECRET" "$HOOK_LOG"
    ! grep -rq "$HOOK_SECRET" "$(run_dir)" "$OUT_DIR"
    [[ $output != *"$HOOK_SECRET"* ]]
    grep -q "^alerts: *on (webhook set, value not recorded)" "$(run_dir)/run.info"
    grep -q "^usd_per_gpu_hour: *GPU_HOURLY_USD=2.5" "$(run_dir)/run.info"
}

@test "alerts: smoke_failed, diverged, preempted, early_stopped, preflight_failed, failed" {
    start_webhook ok
    export FAKE_GPU_COUNT=1
    FAKE_SMOKE_RC=1 run runner;                           [ "$status" -eq 4 ]
    SKIP_SMOKE=1 FAKE_TRAIN_RCS=3 run runner;             [ "$status" -eq 3 ]
    rm -f "$T/fake_train_calls"
    SKIP_SMOKE=1 FAKE_TRAIN_RCS=143 run runner;           [ "$status" -eq 143 ]
    rm -f "$T/fake_train_calls"
    SKIP_SMOKE=1 FAKE_TRAIN_STATUS=early_stopped run runner; [ "$status" -eq 0 ]
    FAKE_PREFLIGHT_RC=2 run runner;                       [ "$status" -eq 7 ]
    rm -f "$T/fake_train_calls"
    SKIP_SMOKE=1 FAKE_TRAIN_RCS=2 run runner;             [ "$status" -eq 2 ]
    wait_events 11
    run events
    [ "${lines[*]}" = "started smoke_failed started diverged started preempted started early_stopped preflight_failed started failed" ]
}

@test "alerts: a stall is announced as stalled" {
    start_webhook ok
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_HANG_AT=15 STALL_TIMEOUT_S=1 STALL_KILL_GRACE_S=1
    run runner
    [ "$status" -eq 0 ]
    wait_events 3
    run events
    [ "${lines[*]}" = "started stalled completed" ]
}

@test "a webhook that hangs, refuses or errors neither slows nor breaks the run" {
    start_webhook hang
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 ALERT_TIMEOUT_S=4 ALERT_RETRIES=3 FAKE_TRAIN_RCS=1,0 ALERT_FINISH_WAIT_S=1
    start=$SECONDS
    run runner
    [ "$status" -eq 0 ]
    # three alerts x three 4 s tries would be > 36 s if sent inline; the run itself takes seconds
    (( SECONDS - start < 15 ))
    [ "$(tail -n1 "$OUT_DIR/training.csv" | cut -d, -f1)" = 20 ]
    wait_events 3
    [ "$(events | head -n1)" = started ]             # it did try
    # nothing listening any more: connection refused
    kill "$WEBHOOK_PID"; WEBHOOK_PID=""
    export ALERT_TIMEOUT_S=2 ALERT_RETRIES=2 ALERT_FINISH_WAIT_S=0
    rm -f "$T/fake_train_calls"
    run runner
    [ "$status" -eq 0 ]
    for _ in $(seq 100); do grep -q "alert 'completed' not delivered" "$(run_dir)/runner.log" && break; sleep 0.1; done
    grep -q "alert 'started' not delivered after 2 tries (URLError: \[Errno 111\] Connection refused); training is unaffected" "$(run_dir)/runner.log"
    # a webhook answering HTTP 500
    start_webhook error
    rm -f "$T/fake_train_calls"
    run runner
    [ "$status" -eq 0 ]
    for _ in $(seq 100); do grep -q "alert 'completed' not delivered" "$(run_dir)/runner.log" && break; sleep 0.1; done
    grep -q "alert 'started' not delivered after 2 tries (HTTP 500); training is unaffected" "$(run_dir)/runner.log"
    [ "$(events | sort | uniq -c | awk '{print $1}' | sort -u)" = 2 ]   # each event tried exactly twice
    ! grep -q "$HOOK_SECRET" "$(run_dir)/runner.log"
}
