#!/usr/bin/env bash
# The one script a GPU session runs to get every GPU number BENCHMARKS.md is waiting for:
#
#     OUT=/some/dir bash bench/gpu_suite.sh          # from the repo root; default OUT=artifacts/gpu_suite
#
# Steps, most important first (each under `timeout`, so a stuck one cannot eat the budget; the suite
# keeps going after a failure and ends with a summary of what ran / failed / timed out / was skipped).
# The number is each step's cap in seconds; together they exceed the budget on purpose: whatever is
# left when the budget runs out is reported as skipped and can be run by a second call (SUITE_ONLY).
#   kernel_tests        240  pytest tests/test_triton_kernels.py tests/test_triton_window.py
#                            tests/test_triton_tune.py tests/test_triton_decode.py tests/test_flash_window.py
#                            tests/test_model.py on the real GPU (not the interpreter; test_model.py for
#                            the CUDA-graph decode)
#   decode              120  bench_decode: 8k..64k, batch 1 (launch-bound) and 32 (read-bound), eager
#                            and replayed as CUDA graphs over static caches (NSA: the fused decode kernel),
#                            each row with its 12 costliest kernels per step (--profile)
#   decode_compiled     240  bench_decode at 64k, batch 1 and 32: the static step with NSA's attention in
#                            PyTorch ops (graph_torch, what the fused kernel replaced), and the static
#                            step through torch.compile, then replayed as a CUDA graph
#   kernels             200  bench_kernels: each Triton kernel alone with its variants (num_warps, the
#                            two selected-attention backwards, window sdpa vs triton, decode), 16k and 64k (116 s in run I)
#   attention_paper     150  bench_attention: paper layout (64 q heads, 4 KV heads, dim 128), attention
#                            core, 4k..64k, nsa vs full, eager and replayed as CUDA graphs, each with a
#                            profile of its 12 costliest kernels (where the 64k time goes; 88 s in run H
#                            without the profiles)
#   attention_m7c        90  bench_attention: M7C layout, whole layer, 4k..64k, fwd and fwd+bwd, nsa vs full,
#                            each with a profile of its 12 costliest kernels (--profile) and a CUDA-graph time
#   train_4096          150  bench_train: seq 4096 x batch 8 (32k tokens/step), eager, nsa vs full (the first
#                            NSA step tunes ~40 kernel variants at M7C, a Triton compile each)
#                            (tokens/s, MFU, peak memory, profile of one step's 60 costliest kernels: run K's 15
#                            left 61 of NSA's 178 ms unnamed)
#   train_16384         150  bench_train: seq 16384 x batch 2 (32k tokens/step), eager
#   train_4096_untuned   90  train_4096 for NSA with the kernel tuning off (NSA_TUNE=off: one query per
#                            selected-attention program, block-centric dK/dV head by head), to show
#                            what tuning gains
#   trainer             200  bench_trainer: the shipped trainer (python -m nsa.train, M7C 80G config, synthetic
#                            tokens, 65k tokens/step), NSA, eager and runtime.compile=true
#   attention_fla       300  bench_attention: paper layout core, nsa vs fla-core's parallel_nsa (when
#                            importable); its own step, with a long cap, because fla's first backward
#                            autotunes for minutes on an H100 (its autotune key leaves out the length, so
#                            once per run): past 100 s at 8k in run A, past 110 s at 4k in run H (cut both
#                            times). When this step is to run, fla is compiled in the background during
#                            kernel_tests (see start_fla_warmup), so put kernel_tests before it
#   demo_64k            150  scripts/demo_64k.py (needle at 4k, 16k, 64k; 90 s was too short cold in run J)
#   train_compile       150  bench_train: seq 4096 with torch.compile (the NSA branches stay eager)
#   attention_m7c_core   90  bench_attention: M7C layout, attention core (no projections)
#   train_compile_16384 150  bench_train: seq 16384 with torch.compile
#   train_loss          120  bench_train: seq 4096 x batch 8, eager, full attention, the cross-entropy chunked
#                            (F.linear_cross_entropy, torch >= 2.13; a skipped row on older torch) vs the
#                            logits then F.cross_entropy: tokens/s and peak memory (M7C.loss, NSA_LOSS)
#   variant_tests       240  the parity tests of every kernel tile variant tuning may pick, at the paper layout
#                            (head dim 128) on the GPU, of the unmasked interior steps, and of the fused decode
#                            kernel: the part of kernel_tests
#                            a session that changed kernels needs first (Triton once miscompiled one for sm_90
#                            that the interpreter ran right); not run when kernel_tests is. In parallel workers
#                            like kernel_tests: run K's single process was cut at 180 s, 32 of 41 tests passed
# Exit status 0 when every step ran and passed, else 1 (the files are written either way).
#
# Output under $OUT (the device runner returns at most 8 files, so logs share one file):
#   summary.txt            environment (nvidia-smi, versions) + one status line per step
#   suite.log              every step's command, stdout and stderr, in order
#   attention.jsonl, kernels.jsonl, train.jsonl, decode.jsonl, demo.jsonl
#                          the JSON lines each bench printed, each tagged with "suite_step"
#
# Environment:
#   OUT=dir                where results go (default artifacts/gpu_suite; files are appended to)
#   SUITE_BUDGET_S=540     total wall-clock budget; keep it ~60 s under the runner's limit. A step gets
#                          min(its cap, what is left - 15 s) and is skipped when under 30 s are left.
#   SUITE_ONLY=a,b         run only these steps (names above), in this order, e.g. what a session most needs
#                          first, or what a first call skipped
#   SUITE_DRY_RUN=1        print the commands (with their timeouts) and run nothing
#   SUITE_REPEATS=5        timed repeats per attention measurement
#   SUITE_WHEELS=.whl      a folder of wheels (e.g. fla_core-0.6.0-py3-none-any.whl) installed with
#                          pip --no-index --target before the run; see BENCHMARKS.md for how to carry it
#   PYTHON=python3         interpreter (default: .venv/bin/python if it sees CUDA, else python3)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-artifacts/gpu_suite}
BUDGET=${SUITE_BUDGET_S:-540}
DRY=${SUITE_DRY_RUN:-0}
ONLY=${SUITE_ONLY:-}
REPS=${SUITE_REPEATS:-5}
WHEELS=${SUITE_WHEELS:-.whl}
RESERVE=${SUITE_RESERVE_S:-15}   # seconds kept back for the summary
MIN_STEP=${SUITE_MIN_STEP_S:-30} # a step with less than this left is skipped
SEQS=4096,8192,16384,32768,65536

mkdir -p "$OUT"
unset TRITON_INTERPRET  # the kernel tests and benches must run the kernels on the GPU
WORK=$(mktemp -d)
SUMMARY=()
FINISHED=0
INCOMPLETE=0

if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-python3}
elif [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi

log() { echo "$*" | tee -a "$OUT/suite.log"; }

show() {  # a command line, quoted where needed, for the logs
    local a out=
    for a; do
        if [[ $a =~ ^[A-Za-z0-9_./,:=+-]+$ ]]; then out+="$a "; else out+="'$a' "; fi
    done
    echo "${out% }"
}

finish() {
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    [ -n "${FLA_WARM_PID:-}" ] && kill "$FLA_WARM_PID" 2>/dev/null  # interrupted during the fla warm-up
    {
        echo
        echo "== gpu_suite summary: $(date -u +%FT%TZ), ${SECONDS}s of ${BUDGET}s budget, OUT=$OUT =="
        printf '%-20s %-26s %7s %6s\n' step status seconds rows
        for line in "${SUMMARY[@]}"; do echo "$line"; done
    } | tee -a "$OUT/summary.txt" | tee -a "$OUT/suite.log"
    rm -rf "$WORK"
    INCOMPLETE=$(printf '%s\n' "${SUMMARY[@]}" | grep -c -E 'FAILED|TIMED OUT|skipped \(budget')
}
trap 'log "gpu_suite: interrupted"; finish; exit 130' INT TERM

in_only() {
    [ -z "$ONLY" ] && return 0
    case ",${ONLY// /,}," in *",$1,"*) return 0 ;; esac
    return 1
}

# step NAME CAP_S GROUP CMD...   (GROUP: the jsonl its JSON lines go to, or - for none)
step() {
    local name=$1 cap=$2 group=$3
    shift 3
    in_only "$name" || return 0
    local left=$((BUDGET - SECONDS - RESERVE))
    if [ "$left" -lt "$MIN_STEP" ]; then
        SUMMARY+=("$(printf '%-20s %-26s %7s %6s' "$name" "skipped (budget: ${left}s)" 0 -)")
        log "== step $name: skipped, ${left}s of budget left"
        return 0
    fi
    local t=$((cap < left ? cap : left))
    if [ "$DRY" = 1 ]; then
        local dest="$OUT/$group.jsonl"
        [ "$group" = - ] && dest="no jsonl"
        echo "[dry-run] $name (timeout ${t}s; JSON lines -> $dest): $(show "$@")"
        SUMMARY+=("$(printf '%-20s %-26s %7s %6s' "$name" "dry-run" 0 -)")
        return 0
    fi
    log ""
    log "===== step $name (timeout ${t}s) at ${SECONDS}s: $(show "$@")"
    local t0=$SECONDS rc
    # stdout+stderr stream into suite.log as they come (partial output survives a kill)
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$OUT/suite.log" >"$WORK/$name.out"
    rc=$?
    local dt=$((SECONDS - t0)) rows=-
    if [ "$group" != - ]; then
        rows=$(grep -c '^{' "$WORK/$name.out")
        [ "$rows" -gt 0 ] && grep '^{' "$WORK/$name.out" | sed "s/^{/{\"suite_step\": \"$name\", /" >>"$OUT/$group.jsonl"
    fi
    local status
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT (${t}s)" ;;
        *) status="FAILED (rc=$rc)" ;;
    esac
    if [ "$name" = kernel_tests ] && grep -q "too slow for the interpreter" "$WORK/$name.out"; then
        status="$status, RAN UNDER INTERPRETER"
    fi
    SUMMARY+=("$(printf '%-20s %-26s %7s %6s' "$name" "$status" "$dt" "$rows")")
    # the tables (and any traceback) also go to the suite's stdout, which the runner returns
    echo "----- $name: $status in ${dt}s"
    grep -v '^{' "$WORK/$name.out" | grep -v '^\s*$' | tail -n 40
}

environment() {
    {
        echo "== gpu_suite environment: $(date -u +%FT%TZ)"
        echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --short 2>/dev/null | wc -l) changed file(s)"
        timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi failed or missing"
        timeout 60 "$PY" - <<'EOF' 2>&1 || echo "python environment check failed"
import importlib.util, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for name in ("fla", "flash_attn", "xdist"):
    spec = importlib.util.find_spec(name)
    print(f"{name}:", "importable" if spec else "not installed")
EOF
    } | tee -a "$OUT/summary.txt" | tee -a "$OUT/suite.log"
}

install_wheels() {
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || return 0
    local f names=
    for f in "$WHEELS"/*.whl; do names+="${f##*/} "; done
    log "installing wheels from $WHEELS: $names"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_suite_site \
        "$WHEELS"/*.whl >>"$OUT/suite.log" 2>&1; then
        export PYTHONPATH=/tmp/gpu_suite_site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "wheel install failed (see suite.log); continuing without them"
    fi
}

STEPS=",kernel_tests,decode,decode_compiled,kernels,attention_paper,attention_m7c,train_4096,train_16384,train_4096_untuned,trainer,attention_fla,demo_64k,train_compile,attention_m7c_core,train_compile_16384,train_loss,variant_tests,"
for s in ${ONLY//,/ }; do
    [[ $STEPS == *",$s,"* ]] || echo "gpu_suite: SUITE_ONLY names an unknown step '$s' (steps: ${STEPS//,/ })" >&2
done
if [ "$DRY" != 1 ]; then
    : >"$OUT/summary.txt"
    install_wheels
    environment
fi

# pytest-xdist (on the device image) compiles the kernels in parallel; the sm_90 AOT test is left out:
# it only runs ptxas without a GPU, which the real CUDA runs here supersede
XDIST=()
if [ "$DRY" = 1 ] || "$PY" -c 'import xdist' 2>/dev/null; then
    WORKERS=$(nproc 2>/dev/null || echo 8)
    XDIST=(-n $((WORKERS > 16 ? 16 : WORKERS)))
fi
# run_step NAME: one step of the suite (the table at the top says what each shows)
run_step() {
    case $1 in
    kernel_tests)
        # -v: each test's result as it ends, so a step cut by its timeout still names what failed;
        # --log-level: a failure's captured log without torch's DEBUG trace (thousands of lines)
        step kernel_tests 240 - \
            "$PY" -m pytest -v -rfEs --tb=short --log-level=WARNING -p no:cacheprovider -p no:benchmark \
            ${XDIST[@]+"${XDIST[@]}"} tests/test_triton_kernels.py \
            tests/test_triton_window.py tests/test_triton_tune.py tests/test_triton_decode.py tests/test_flash_window.py \
            tests/test_model.py \
            -k "not compile_for_sm90"
        ;;
    variant_tests)
        in_only kernel_tests && return 0  # kernel_tests runs these too
        step variant_tests 240 - \
            "$PY" -m pytest -v -rfEs --tb=short --log-level=WARNING -p no:cacheprovider -p no:benchmark \
            ${XDIST[@]+"${XDIST[@]}"} tests/test_triton_kernels.py tests/test_triton_window.py tests/test_triton_decode.py \
            -k "tile_variants or key_rows or head_tile or tile_shapes or interior or fused_decode_matches or fused_decode_small or decodes_through"
        ;;
    decode)
        step decode 120 decode \
            "$PY" bench/bench_decode.py --device cuda --contexts 8192,16384,32768,65536 --batches 1,32 --steps 20 \
            --profile 12
        ;;
    decode_compiled)
        step decode_compiled 240 decode \
            "$PY" bench/bench_decode.py --device cuda --contexts 65536 --batches 1,32 --steps 20 --modes graph_torch,compiled
        ;;
    kernels)
        step kernels 200 kernels \
            "$PY" bench/bench_kernels.py --device cuda --layout both --seq-lens 16384,65536
        ;;
    attention_paper)
        step attention_paper 150 attention \
            "$PY" bench/bench_attention.py --device cuda --layout paper --scope core --seq-lens $SEQS --repeats "$REPS" \
            --impls nsa,full --cuda-graph --profile 12
        ;;
    attention_m7c)
        step attention_m7c 90 attention \
            "$PY" bench/bench_attention.py --device cuda --layout m7c --scope layer --seq-lens $SEQS --repeats "$REPS" \
            --profile 12 --cuda-graph
        ;;
    train_4096)
        step train_4096 150 train \
            "$PY" bench/bench_train.py --device cuda --seq-lens 4096 --batch-tokens 32768 --compile 0 --steps 8 --warmup 3 \
            --profile 60
        ;;
    train_16384)
        step train_16384 150 train \
            "$PY" bench/bench_train.py --device cuda --seq-lens 16384 --batch-tokens 32768 --compile 0 --steps 6 --warmup 2 \
            --profile 60
        ;;
    train_4096_untuned)
        # the reference kernel variants, untuned (rows carry "nsa_env"; the tuned rows above carry "tuned")
        step train_4096_untuned 90 train \
            env NSA_TUNE=off \
            "$PY" bench/bench_train.py --device cuda --seq-lens 4096 --batch-tokens 32768 --compile 0 --steps 8 --warmup 3 \
            --attention nsa --profile 15
        ;;
    trainer)
        step trainer 200 train \
            "$PY" bench/bench_trainer.py --config configs/m7c_125m_80g.yaml --steps 20 --batch-tokens 65536 --compile 0,1 \
            --attention nsa --timeout 150
        ;;
    attention_fla)
        step attention_fla 300 attention \
            "$PY" bench/bench_attention.py --device cuda --layout paper --scope core --seq-lens $SEQS --repeats "$REPS" \
            --impls nsa,fla
        ;;
    demo_64k)
        step demo_64k 150 demo \
            "$PY" scripts/demo_64k.py --device cuda --contexts 4096,16384,65536
        ;;
    train_compile)
        step train_compile 150 train \
            "$PY" bench/bench_train.py --device cuda --seq-lens 4096 --batch-tokens 32768 --compile 1 --steps 6 --warmup 2
        ;;
    attention_m7c_core)
        step attention_m7c_core 90 attention \
            "$PY" bench/bench_attention.py --device cuda --layout m7c --scope core --seq-lens $SEQS --repeats "$REPS"
        ;;
    train_compile_16384)
        step train_compile_16384 150 train \
            "$PY" bench/bench_train.py --device cuda --seq-lens 16384 --batch-tokens 32768 --compile 1 --steps 6 --warmup 2
        ;;
    train_loss)
        step train_loss 120 train \
            "$PY" bench/bench_train.py --device cuda --seq-lens 4096 --batch-tokens 32768 --compile 0 --steps 8 --warmup 3 \
            --attention full --loss chunked,full
        ;;
    esac
}

# fla's first backward autotunes for minutes, nearly all of it Triton compiling on the CPU. When the
# suite will run attention_fla, one fwd+bwd of fla at the paper layout runs in the background during
# kernel_tests (which times nothing): the compiled kernels and fla's autotune choices land in the
# Triton cache on disk (fla's autotune keys leave out the length), so the attention_fla step loads them.
# The suite waits for it before the next step, so it never overlaps a timed one.
FLA_WARM_PID=
start_fla_warmup() {
    in_only attention_fla && [ "$DRY" != 1 ] || return 0
    "$PY" -c 'import fla' 2>/dev/null || return 0
    local left=$((BUDGET - SECONDS - RESERVE))
    [ "$left" -ge "$MIN_STEP" ] || return 0
    local t=$((left < 300 ? left : 300))
    log "fla warm-up (background, timeout ${t}s): compiling fla's parallel_nsa during kernel_tests"
    FLA_WARM_T0=$SECONDS
    timeout -k 10 "$t" "$PY" bench/bench_attention.py --device cuda --layout paper --scope core --seq-lens 4096 \
        --repeats 1 --impls fla --passes fwd_bwd >"$WORK/fla_warmup.out" 2>&1 &
    FLA_WARM_PID=$!
}
finish_fla_warmup() {
    [ -n "$FLA_WARM_PID" ] || return 0
    local rc=0
    wait "$FLA_WARM_PID" || rc=$?
    FLA_WARM_PID=
    log "fla warm-up: rc=$rc after $((SECONDS - FLA_WARM_T0))s (its output, last lines:)"
    tail -n 5 "$WORK/fla_warmup.out" | tee -a "$OUT/suite.log"
}

# in the order listed: SUITE_ONLY's order when given (what matters most to this session first), else STEPS's
ORDER=${ONLY:-${STEPS//,/ }}
for s in ${ORDER//,/ }; do
    [[ $STEPS == *",$s,"* ]] || continue
    [ "$s" = kernel_tests ] && start_fla_warmup
    run_step "$s"
    finish_fla_warmup
done
finish
exit $((INCOMPLETE > 0))
