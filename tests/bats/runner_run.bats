#!/usr/bin/env bats
# scripts/train_m7c_prime.sh end to end against the fake trainer: smoke gate, resume, run.info,
# lock, supervisor, signals, secrets. Fake nvidia-smi/torchrun on PATH, fake venv python.

load helpers

setup() { setup_sandbox; }

@test "full run: smoke gate (run, then resume from its mid-way checkpoint), then training with --resume auto" {
    export FAKE_GPU_COUNT=2
    run runner
    [ "$status" -eq 0 ]
    # smoke twice through the same launcher (torchrun), then real training
    run cat "$FAKE_TRAIN_LOG"
    [ "${#lines[@]}" -eq 3 ]
    [[ ${lines[0]} == "smoke --config $CONFIG_DIR/smoke.yaml --dataset synthetic --out-dir $(run_dir)/smoke --resume none" ]]
    [[ ${lines[1]} == "smoke --config $CONFIG_DIR/smoke.yaml --dataset synthetic --out-dir $(run_dir)/smoke --resume auto" ]]
    [[ ${lines[2]} == "train --config $CONFIG_DIR/m7c_125m_80g.yaml --resume auto --out-dir $OUT_DIR" ]]
    run cat "$FAKE_TORCHRUN_LOG"
    [ "${#lines[@]}" -eq 3 ]
    [[ ${lines[2]} == "torchrun --standalone --nproc_per_node=2 -m nsa.train --config $CONFIG_DIR/m7c_125m_80g.yaml --resume auto --out-dir $OUT_DIR" ]]
    # the smoke resumed from step 25 and the check passed
    grep -q "fake trainer: resumed from step 25" "$(run_dir)/smoke.log"
    grep -q "smoke check OK: .* resumed from checkpoint step 25 to 50" "$(run_dir)/smoke.log"
    # run folder contents
    [ -s "$(run_dir)/run.info" ] && [ -s "$(run_dir)/smoke.log" ] && [ -s "$(run_dir)/train.log" ] && [ -s "$(run_dir)/runner.log" ]
    grep -q "fake trainer: train finished at step 20 with exit code 0" "$(run_dir)/train.log"
    [ "$(readlink "$RUNS_ROOT/latest")" = "$(basename "$(run_dir)")" ]
    [[ $(basename "$(run_dir)") =~ ^m7c_[0-9]{8}-[0-9]{6}$ ]]
    [ -f "$OUT_DIR/training.csv" ] && [ -f "$OUT_DIR/metrics.json" ]
}

@test "the NCCL environment reaches the trainer, with user exports untouched" {
    export FAKE_GPU_COUNT=2 FAKE_GPU_TOPO=pcie SKIP_SMOKE=1 NCCL_DEBUG=TRACE
    run runner
    [ "$status" -eq 0 ]
    grep -qx "NCCL_DEBUG=TRACE" "$FAKE_ENV_LOG"
    grep -qx "NCCL_IB_DISABLE=1" "$FAKE_ENV_LOG"
    grep -qx "NCCL_P2P_DISABLE=1" "$FAKE_ENV_LOG"
    grep -qx "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" "$FAKE_ENV_LOG"
    FAKE_GPU_TOPO=nvlink run runner
    [ "$status" -eq 0 ]
    tail -n 5 "$FAKE_ENV_LOG" | { ! grep -q NCCL_P2P_DISABLE; }
}

@test "run.info holds every field" {
    export FAKE_GPU_COUNT=8 FAKE_GPU_NAME="NVIDIA H100 80GB HBM3" FAKE_GPU_VRAM_MIB=81559
    run runner
    [ "$status" -eq 0 ]
    for key in run_id run_dir started_utc host git_commit git_branch config config_choice config_sha256 \
               config_summary dataset steps out_dir device gpu_count gpu_count_detected gpu_models gpu_vram_gib \
               gpu_vram_max_gib driver_version cuda_driver_version torch_version torch_cuda_version python_version \
               python_executable nnodes node_rank master world_size launcher topology nccl_env launch_command smoke \
               resume_mode resume_from supervise smoke_result attempt_1_started_utc attempt_1_exit finished_utc exit_code; do
        grep -q "^$key: " "$(run_dir)/run.info" || { echo "missing $key"; cat "$(run_dir)/run.info"; false; }
    done
    [ "$(info_value gpu_count)" = 8 ]
    [ "$(info_value gpu_models)" = "8x NVIDIA H100 80GB HBM3" ]
    [[ $(info_value gpu_vram_max_gib) == 79.6 ]]
    [ "$(info_value driver_version)" = 550.54.15 ]
    [ "$(info_value cuda_driver_version)" = 12.4 ]
    # the torch probe's answer, parsed (the fake venv's python imports a stub torch: tests/bats/fakes/pystubs)
    [ "$(info_value torch_version)" = "2.99.0+bats.stub" ]
    [ "$(info_value torch_cuda_version)" = "none (CPU build)" ]
    [[ $(info_value python_version) =~ ^3\.[0-9]+\.[0-9]+$ ]]
    [ "$(info_value config)" = "$CONFIG_DIR/m7c_125m_80g.yaml" ]
    [[ $(info_value launch_command) == "torchrun --standalone --nproc_per_node=8 -m nsa.train --config"* ]]
    [[ $(info_value resume_from) == "none (no checkpoint in"* ]]
    [[ $(info_value exit_code) == "0 (completed"* ]]
}

@test "smoke failure aborts before training and names smoke.log" {
    export FAKE_GPU_COUNT=1 FAKE_SMOKE_RC=1
    run runner
    [ "$status" -eq 4 ]
    [[ $output == *"smoke gate failed"*"$(run_dir)/smoke.log"* ]]
    ! grep -q '^train ' "$FAKE_TRAIN_LOG"
    [ ! -e "$(run_dir)/train.log" ]
    [[ $(info_value smoke_result) == FAILED* ]]
}

@test "a NaN loss in the smoke run fails the gate" {
    FAKE_SMOKE_NAN=1 run runner
    [ "$status" -eq 4 ]
    [[ $output == *"non-finite loss at step(s) [3]"* ]]
    ! grep -q '^train ' "$FAKE_TRAIN_LOG"
}

@test "an existing checkpoint leads to resume" {
    mkdir -p "$OUT_DIR"
    echo "step,loss,lr,toks_per_s" >"$OUT_DIR/training.csv"
    for i in $(seq 1 12); do echo "$i,5.0,0.0003,1000" >>"$OUT_DIR/training.csv"; done
    echo x >"$OUT_DIR/checkpoint_step12.pt"
    SKIP_SMOKE=1 run runner
    [ "$status" -eq 0 ]
    [[ $output == *"resume from  : $OUT_DIR/checkpoint_step12.pt"* ]]
    grep -q -- "--resume auto" "$FAKE_TRAIN_LOG"
    grep -q "fake trainer: resumed from step 12" "$(run_dir)/train.log"
    [ "$(info_value resume_from)" = "$OUT_DIR/checkpoint_step12.pt" ]
    [ "$(info_value attempt_1_resume_from)" = "$OUT_DIR/checkpoint_step12.pt" ]
}

@test "the lock refuses a second runner on the same output folder, naming the first" {
    export SKIP_SMOKE=1 FAKE_TRAIN_SLEEP=4
    bash "$REPO/scripts/train_m7c_prime.sh" >"$T/first.out" 2>&1 &
    first=$!
    for _ in $(seq 1 100); do grep -q "run folder" "$OUT_DIR/.runner.lock" 2>/dev/null && break; sleep 0.1; done
    FAKE_TRAIN_SLEEP=0 run runner
    [ "$status" -eq 5 ]
    [[ $output == *"another runner is already using"*"pid $first"*"run folder"* ]]
    wait "$first"
    # a different OUT_DIR is fine meanwhile, and the folder is free again afterwards
    FAKE_TRAIN_SLEEP=0 run runner
    [ "$status" -eq 0 ]
}

@test "supervisor restarts crashes with --resume auto until success" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_RCS=1,1,0
    run runner
    [ "$status" -eq 0 ]
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 3 ]
    [ "$(grep -c -- '--resume auto' "$FAKE_TRAIN_LOG")" -eq 3 ]
    [[ $output == *"restart 1/5"* && $output == *"restart 2/5"* ]]
    grep -q "fake trainer: resumed from step 10" "$(run_dir)/train.log"
    [ "$(info_value attempt_2_resume_from)" = "$OUT_DIR/checkpoint_step10.pt" ]
    [[ $(info_value attempt_1_exit) == "1 (crashed)" ]]
}

@test "supervisor: RESUME=none becomes --resume auto on restart" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_RCS=1,0 RESUME=none
    run runner
    [ "$status" -eq 0 ]
    run cat "$FAKE_TRAIN_LOG"
    [[ ${lines[0]} == *"--resume none"* && ${lines[1]} == *"--resume auto"* ]]
}

@test "supervisor gives up after MAX_RESTARTS" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_RCS=1 MAX_RESTARTS=2
    run runner
    [ "$status" -eq 1 ]
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 3 ]
    [[ $output == *"gave up after 2 restart(s)"* ]]
}

@test "config error (2), divergence (3) and preemption (143) are never retried" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1
    for rc in 2 3 143; do
        rm -f "$FAKE_TRAIN_LOG" "$T/fake_train_calls"
        FAKE_TRAIN_RCS=$rc,0 run runner
        [ "$status" -eq "$rc" ] || { echo "rc=$rc status=$status $output"; false; }
        [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 1 ]
    done
}

@test "CPU default: supervisor off, a crash is reported, not retried" {
    export SKIP_SMOKE=1 FAKE_TRAIN_RCS=1,0
    run runner
    [ "$status" -eq 1 ]
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 1 ]
    [[ $output == *"supervisor off"* ]]
}

@test "SIGTERM to the runner reaches the trainer once and ends with 143, no restart" {
    export FAKE_GPU_COUNT=1 SKIP_SMOKE=1 FAKE_TRAIN_SLEEP=30
    bash "$REPO/scripts/train_m7c_prime.sh" >"$T/out.txt" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do grep -q "^train " "$FAKE_TRAIN_LOG" 2>/dev/null && break; sleep 0.1; done
    sleep 0.5
    kill -TERM "$pid"
    rc=0; wait "$pid" || rc=$?
    [ "$rc" -eq 143 ]
    grep -q "asking the trainer" "$T/out.txt"
    grep -q "fake trainer: got SIGTERM, exiting 143" "$(run_dir)/train.log"
    [ "$(grep -c '^train ' "$FAKE_TRAIN_LOG")" -eq 1 ]
    [[ $(info_value exit_code) == 143* ]]
}

@test "secrets never land in run.info, runner.log or train.log" {
    # fake secrets, assembled at run time so no token-shaped literal is committed
    export SKIP_SMOKE=1 HF_TOKEN="hf_AbCdEfGhIjKlMn""OpQrStUvWxYz0123456789" MY_WEBHOOK_URL="https://hooks.slack"".com/services/T0/B0/s3cr3tv4lue"
    export FAKE_TRAIN_PRINT="debug: token $HF_TOKEN webhook $MY_WEBHOOK_URL"
    run runner "logging.webhook=$MY_WEBHOOK_URL" "data.hf_token=$HF_TOKEN"
    [ "$status" -eq 0 ]
    ! grep -rq -e "$HF_TOKEN" -e "s3cr3tv4lue" "$(run_dir)"
    ! grep -q -e "$HF_TOKEN" -e "s3cr3tv4lue" <<<"$output"
    grep -q "debug: token \*\*\* webhook \*\*\*" "$(run_dir)/train.log"
    grep -q "logging.webhook=\\\\\*\\\\\*\\\\\*\|logging.webhook=\*\*\*" "$(run_dir)/run.info"
}

@test "a missing venv is bootstrapped before training (bootstrap failure stops the run)" {
    export VENV_DIR="$T/fresh-venv" REQUIREMENTS="$T/no-such-requirements.txt" SKIP_SMOKE=1
    run runner
    [ "$status" -ne 0 ]
    [[ $output == *"bootstrapping first"* ]]
    [[ $output == *"no-such-requirements.txt is missing"* ]]
    [ ! -s "$FAKE_TRAIN_LOG" ]
}
