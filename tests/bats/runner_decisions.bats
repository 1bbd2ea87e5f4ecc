#!/usr/bin/env bats
# Decisions of scripts/train_m7c_prime.sh (DRY_RUN=1): VRAM tier -> config, GPU count -> launcher,
# NCCL environment, topology, overrides, multi-node. Fake nvidia-smi/torchrun on PATH.

load helpers

setup() { setup_sandbox; export DRY_RUN=1; }

@test "VRAM tiers 24/40/48/80/141 GB pick 24g/40g/40g/80g/80g" {
    export FAKE_GPU_COUNT=1
    for pair in 24:24g 40:40g 48:40g 80:80g 141:80g 16:24g; do
        FAKE_GPU_VRAM_GB=${pair%%:*} run runner
        [ "$status" -eq 0 ]
        [[ $output == *"config       : $CONFIG_DIR/m7c_125m_${pair##*:}.yaml"* ]] || { echo "$pair -> $output"; false; }
    done
}

@test "an H100 reporting 81559 MiB and a 40 GB A100 at 40960 MiB land in their tiers" {
    export FAKE_GPU_COUNT=1
    FAKE_GPU_VRAM_MIB=81559 run runner
    [[ $output == *"m7c_125m_80g.yaml"* ]]
    FAKE_GPU_VRAM_MIB=40960 run runner
    [[ $output == *"m7c_125m_40g.yaml"* ]]
}

@test "the largest GPU picks the tier and mixed sizes warn" {
    FAKE_GPU_COUNT=2 FAKE_GPU_VRAM_GB=24,80 run runner
    [ "$status" -eq 0 ]
    [[ $output == *"m7c_125m_80g.yaml"* ]]
    [[ $output == *"different memory sizes"* ]]
}

@test "no GPU picks the CPU config and plain python" {
    run runner
    [ "$status" -eq 0 ]
    [[ $output == *"config       : $CONFIG_DIR/m7c_cpu.yaml  [no GPU: CPU default]"* ]]
    [[ $output == *"launcher     : python"* ]]
    [[ $output == *"train command: python -m nsa.train --config $CONFIG_DIR/m7c_cpu.yaml --resume auto --out-dir $OUT_DIR"* ]]
    [[ $output == *"supervisor   : off"* ]]
}

@test "1 GPU uses python, 2 and 8 GPUs use torchrun --nproc_per_node=N" {
    FAKE_GPU_COUNT=1 run runner
    [[ $output == *"train command: python -m nsa.train --config $CONFIG_DIR/m7c_125m_80g.yaml"* ]]
    [[ $output == *"supervisor   : on"* ]]
    FAKE_GPU_COUNT=2 run runner
    [[ $output == *"train command: torchrun --standalone --nproc_per_node=2 -m nsa.train"* ]]
    FAKE_GPU_COUNT=8 run runner
    [[ $output == *"train command: torchrun --standalone --nproc_per_node=8 -m nsa.train"* ]]
    [[ $output == *"8x NVIDIA Fake GPU"* ]]
}

@test "CUDA_VISIBLE_DEVICES restricts the GPUs counted" {
    FAKE_GPU_COUNT=8 CUDA_VISIBLE_DEVICES=2,5 run runner
    [[ $output == *"--nproc_per_node=2"* ]]
}

@test "overrides: CONFIG, NGPU, DATASET, STEPS, OUT_DIR, SKIP_SMOKE, SUPERVISE, MAX_RESTARTS, extra args" {
    export FAKE_GPU_COUNT=8
    CONFIG=$CONFIG_DIR/m7c_125m_24g.yaml NGPU=4 DATASET=synthetic STEPS=123 OUT_DIR=$T/elsewhere SKIP_SMOKE=1 \
        SUPERVISE=0 MAX_RESTARTS=9 run runner train.lr=1e-4
    [ "$status" -eq 0 ]
    [[ $output == *"config       : $CONFIG_DIR/m7c_125m_24g.yaml  [CONFIG (your override)]"* ]]
    [[ $output == *"train command: torchrun --standalone --nproc_per_node=4 -m nsa.train --config $CONFIG_DIR/m7c_125m_24g.yaml --resume auto --out-dir $T/elsewhere --dataset synthetic --steps 123 train.lr=1e-4"* ]]
    [[ $output == *"smoke gate   : SKIPPED"* ]]
    [[ $output == *"supervisor   : off (SUPERVISE=0)"* ]]
    NGPU=0 run runner
    [[ $output == *"m7c_cpu.yaml"* && $output == *"launcher     : python"* ]]
    MAX_RESTARTS=9 run runner
    [[ $output == *"up to 9 times"* ]]
}

@test "bad overrides fail with one clear line" {
    FAKE_GPU_COUNT=1 NGPU=4 run runner
    [ "$status" -eq 2 ]
    [[ $output == *"NGPU=4 but nvidia-smi sees 1 GPU(s)"* ]]
    CONFIG=configs/nope.yaml run runner
    [ "$status" -eq 2 ]
    [[ $output == *"config file 'configs/nope.yaml' not found"* ]]
    STEPS=abc run runner
    [ "$status" -eq 2 ]
    [[ $output == *"STEPS='abc' is not a non-negative integer"* ]]
    run runner --steps 5
    [ "$status" -eq 2 ]
    [[ $output == *"unexpected argument '--steps'"* ]]
}

@test "multi-node: NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT go into torchrun's rendezvous" {
    FAKE_GPU_COUNT=8 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.2.3 MASTER_PORT=29555 run runner
    [ "$status" -eq 0 ]
    [[ $output == *"train command: torchrun --nnodes=2 --node_rank=1 --master_addr=10.1.2.3 --master_port=29555 --nproc_per_node=8 -m nsa.train"* ]]
    [[ $output == *"world size 16"* ]]
    FAKE_GPU_COUNT=1 NNODES=2 run runner
    [ "$status" -eq 2 ]
    [[ $output == *"MASTER_ADDR is not set"* ]]
}

@test "NCCL defaults are set for multi-GPU and user exports are kept" {
    export FAKE_GPU_COUNT=2
    run runner
    [[ $output == *"NCCL_DEBUG=WARN (set by runner"* ]]
    [[ $output == *"NCCL_IB_DISABLE=1 (set by runner: no InfiniBand"* ]]
    [[ $output == *"TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set by runner"* ]]
    NCCL_DEBUG=INFO NCCL_IB_DISABLE=0 TORCH_NCCL_ASYNC_ERROR_HANDLING=3 run runner
    [[ $output == *"NCCL_DEBUG=INFO (kept: exported by you)"* ]]
    [[ $output == *"NCCL_IB_DISABLE=0 (kept: exported by you)"* ]]
    [[ $output == *"TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (kept: exported by you)"* ]]
}

@test "InfiniBand present: NCCL_IB_DISABLE is left alone" {
    mkdir -p "$T/ib/mlx5_0"
    FAKE_GPU_COUNT=2 NSA_IB_SYSFS="$T/ib" run runner
    [[ $output == *"NCCL_IB_DISABLE left unset (InfiniBand device present)"* ]]
}

@test "NVLink keeps P2P on, PCIe disables it, a user export wins either way" {
    export FAKE_GPU_COUNT=4
    FAKE_GPU_TOPO=nvlink run runner
    [[ $output == *"topology     : nvlink"* ]]
    [[ $output == *"NCCL_P2P_DISABLE left unset (NVLink topology"* ]]
    [[ $output != *"NCCL_P2P_DISABLE=1"* ]]
    FAKE_GPU_TOPO=pcie run runner
    [[ $output == *"topology     : pcie"* ]]
    [[ $output == *"NCCL_P2P_DISABLE=1 (set by runner: PCIe-only topology"* ]]
    FAKE_GPU_TOPO=pcie NCCL_P2P_DISABLE=0 run runner
    [[ $output == *"NCCL_P2P_DISABLE=0 (kept: exported by you)"* ]]
    FAKE_GPU_TOPO=fail run runner
    [[ $output == *"topology     : unknown"* ]]
}

@test "single process: no NCCL variables are set" {
    FAKE_GPU_COUNT=1 run runner
    [[ $output == *"single process: NCCL not used"* ]]
    [[ $output != *"NCCL_DEBUG"* ]]
}

@test "an existing checkpoint is the announced resume point" {
    mkdir -p "$OUT_DIR"
    for s in 100 1200 300; do echo x >"$OUT_DIR/checkpoint_step$s.pt"; done
    : >"$OUT_DIR/checkpoint_step9999.pt"   # empty = half-written: ignored
    run runner
    [[ $output == *"resume from  : $OUT_DIR/checkpoint_step1200.pt"* ]]
    [[ $output == *"--resume auto"* ]]
    RESUME=none run runner
    [[ $output == *"resume from  : none (RESUME=none"* ]]
}

@test "DRY_RUN bootstraps nothing, locks nothing and creates no run folder" {
    export VENV_DIR="$T/not-yet-a-venv"
    run runner
    [ "$status" -eq 0 ]
    [[ $output == *"DRY RUN"* ]]
    [ ! -e "$VENV_DIR" ]
    [ ! -e "$RUNS_ROOT" ]
    [ ! -e "$OUT_DIR" ]
    [ ! -s "$FAKE_TRAIN_LOG" ]
}

@test "the out_dir of the config is used when OUT_DIR is not set" {
    unset OUT_DIR
    printf 'train:\n  steps: 5\n  out_dir: artifacts/custom_out # comment\nother:\n  out_dir: nope\n' >"$T/configs/m7c_cpu.yaml"
    run runner
    [[ $output == *"--out-dir artifacts/custom_out"* ]]
}
