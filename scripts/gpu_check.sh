#!/usr/bin/env bash
# Every GPU check this project has, in one run that fits one short device session.
#
# Why: a GPU is lent only now and then, for minutes, so one call must bring back all
# there is to learn: the environment, the kernel tests on CUDA with compiled Triton,
# the kernel benchmark and the MFU benchmark. Each step runs under its own timeout
# (a hang costs that step only), later steps run whatever an earlier one returned, and
# the whole run stays inside a time budget (GPU_CHECK_BUDGET_S, default 450 s).
#
#   bash scripts/gpu_check.sh [OUT_DIR]               # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke [OUT_DIR]   # anywhere: same steps, CPU, seconds
#
# OUT_DIR defaults to $OUT, else gpu_out. It receives at most 8 files, each step's
# output also shown on stdout:
#   env.txt                 nvidia-smi, python, torch/triton versions, device, git state
#   kernel_tests.txt        MEGATRON_PACI_TEST_DEVICE=cuda pytest tests/kernels (compiled)
#   bench_kernels.txt       the bench_kernels.py runs (and its norm-tile sweep) and
#                           bench_ce_memory.py (cross-entropy peak memory, fused vs torch)
#   kernels_gpu.md          bench_kernels.py --no-compile: Triton vs torch eager, targets
#   kernels_gpu_compile.md  bench_kernels.py with the torch.compile rows (if time is left)
#   train_gpu.txt           a real pretrain_gpt.py run (bf16, Triton) stopped and resumed,
#                           then GPT-2 Medium through pretrain_gpt.py (its log's MFU)
#   bench_mfu.txt           bench_mfu.py (kernels.backend=auto), then --backend torch
#   summary.txt             step, exit status (124/137: timed out), seconds, command
# The exit status is 0 when every step that ran exited 0.
#
# --cpu-smoke runs the same plumbing on a CPU in seconds: a few kernel tests through
# Triton's interpreter and both benchmarks with --smoke; its numbers mean nothing.
#
# Not run here: tests/distributed/test_fused_cross_entropy.py. Its gloo ranks use CPU
# tensors and switch Triton's interpreter on themselves, so on the GPU machine it would
# only repeat the CPU run (CI covers it) and spend device time on no GPU code.
set -u

usage() {
    sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

SMOKE=0
ENV_ONLY=0  # --env-report: the env step, run by this script under `timeout`
TRAIN_RUN=""  # --train-run=ITERS,STOP: the train_gpu step, likewise
TRAIN_MEDIUM=""  # --train-medium=ITERS,MICRO: the train_medium step, likewise
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        --env-report) ENV_ONLY=1 ;;
        --train-run=*) TRAIN_RUN=${arg#*=} ;;
        --train-medium=*) TRAIN_MEDIUM=${arg#*=} ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *)
            if [ -n "$OUT_ARG" ]; then
                echo "gpu_check.sh: one output folder only (got $OUT_ARG and $arg)" >&2
                exit 2
            fi
            OUT_ARG=$arg
            ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# Every mode runs the repository's code as checked out, not an installed copy.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# What ran where: without this, numbers from a lent machine cannot be compared later.
env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(hostname); cpus: $(nproc --all)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'no repository here')"
    git -C "$ROOT" status --short 2>/dev/null | head -40
    echo "TRITON_INTERPRET=${TRITON_INTERPRET-<unset>}" \
        "MEGATRON_PACI_TEST_DEVICE=${MEGATRON_PACI_TEST_DEVICE-<unset>}"
    "$PY" - <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "numpy", "yaml", "pytest", "sentencepiece"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # report and go on: the steps below will say what it breaks
        print(name, "NOT importable:", type(e).__name__, e)
import torch  # noqa: E402

print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), "| capability",
          torch.cuda.get_device_capability(0), "|", p.multi_processor_count, "SMs |",
          round(p.total_memory / 2**30, 1), "GiB")
EOF
}

if [ "$ENV_ONLY" = 1 ]; then
    env_report
    exit
fi

# random_tokens PREFIX DOCS VOCAB: an indexed dataset of DOCS documents of 4096 random
# tokens below VOCAB, for runs that measure speed or need no sentencepiece.
random_tokens() {
    "$PY" - "$@" <<'EOF'
import sys

import numpy as np

from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder

prefix, docs, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
for _ in range(docs):
    builder.add_document(rng.integers(0, vocab - 1, size=4096))
builder.finalize(prefix + ".idx")
print(f"random tokens: {docs} documents of 4096 below {vocab} at {prefix}")
EOF
}

# --train-run=ITERS,STOP: a small corpus, tokenizer and indexed data, then a tiny GPT
# trained with everything on auto, stopped at STOP and relaunched to finish ITERS.
# Without sentencepiece (the device image may lack it): random tokens, null tokenizer.
if [ -n "$TRAIN_RUN" ]; then
    cd "$ROOT" || exit 2
    iters=${TRAIN_RUN%,*} stop=${TRAIN_RUN#*,}
    data=$(mktemp -d) || exit 2
    set -e
    sample=()
    if "$PY" -c "import sentencepiece" 2>/dev/null; then
        "$PY" -m data_prep.build_corpus --output "$data" --sources pydoc --max-mb 0.4
        "$PY" -m data_prep.train_tokenizer --input "$data/corpus.jsonl" --vocab-size 512 \
            --output "$data/tok"
        "$PY" -m data_prep.preprocess --input "$data/corpus.jsonl" \
            --tokenizer "$data/tok.model" --output-prefix "$data/text_document" \
            --append-eod --workers 2
        tokenizer=$data/tok.model
    else
        echo "sentencepiece is not importable: random tokens and the null tokenizer instead"
        random_tokens "$data/text_document" 64 512
        tokenizer=null:512
        sample=("train.sample_prompt=")  # tiny.yaml's text prompt is not token ids
    fi
    cfg=(pretrain_gpt.py --config configs/tiny.yaml "data.path=[$data/text_document]"
        "data.tokenizer=$tokenizer" "run.dir=$data/run" "train.iters=$iters"
        "train.eval_interval=$stop" train.eval_iters=1 checkpoint.interval=0
        logging.plot=false "${sample[@]}")
    "$PY" "${cfg[@]}" "train.exit_interval=$stop"
    "$PY" "${cfg[@]}"
    exit
fi

# --train-medium=ITERS,MICRO: GPT-2 Medium (configs/gpt2_medium.yaml, or a 2-layer
# model with --cpu-smoke) through pretrain_gpt.py on random tokens (twice what ITERS
# iterations of 8 micro-batches of MICRO read): the trainer's own tokens/s and MFU,
# executor and data loader included, beside bench_mfu.py's bare training step.
if [ -n "$TRAIN_MEDIUM" ]; then
    cd "$ROOT" || exit 2
    iters=${TRAIN_MEDIUM%,*} micro=${TRAIN_MEDIUM#*,}
    data=$(mktemp -d) || exit 2
    set -e
    random_tokens "$data/random" "$((iters * micro * 8 * 1025 / 2048 + 8))" 50257
    extra=()
    if [ "$SMOKE" = 1 ]; then
        extra=(model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4
            model.seq_length=64)
    fi
    "$PY" pretrain_gpt.py --config configs/gpt2_medium.yaml "data.path=[$data/random]" \
        data.tokenizer=null:50257 "train.iters=$iters" "train.micro_batch_size=$micro" \
        "train.global_batch_size=$((micro * 8))" train.eval_interval=0 \
        checkpoint.save_at_end=false logging.interval=1 logging.plot=false \
        "run.dir=$data/run" "${extra[@]}"
    exit
fi

OUT_DIR=${OUT_ARG:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
cd "$ROOT" || exit 2

BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
SUMMARY=$OUT_DIR/summary.txt
FAILED=0
LAST_RC=0

for f in env.txt kernel_tests.txt bench_kernels.txt kernels_gpu.md kernels_gpu_compile.md \
    bench_mfu.txt train_gpu.txt summary.txt; do
    rm -f "$OUT_DIR/$f"
done
printf '%-22s %-8s %7s  %s\n' step status seconds command >"$SUMMARY"

record() {  # record NAME STATUS SECONDS WHAT
    printf '%-22s %-8s %7s  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
}

# run_step NAME LIMIT_S MIN_S FILE CMD...: CMD under `timeout`, output appended to FILE
# and shown; skipped when less than MIN_S of the budget is left, else given
# min(LIMIT_S, what is left). Sets LAST_RC (the exit status, or "skipped").
run_step() {
    local name=$1 limit=$2 min=$3 file=$4
    shift 4
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < min)); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left (needs ${min}s)"
        record "$name" skipped 0 "budget: ${left}s left, needs ${min}s: $*"
        LAST_RC=skipped
        return
    fi
    ((limit > left)) && limit=$left
    printf '\n=== %s (timeout %ss): %s\n' "$name" "$limit" "$*" | tee -a "$OUT_DIR/$file"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee -a "$OUT_DIR/$file"
    LAST_RC=${PIPESTATUS[0]}
    record "$name" "$LAST_RC" $((SECONDS - t0)) "$*"
    [ "$LAST_RC" = 0 ] || FAILED=1
}

skip_step() {  # skip_step NAME WHY
    echo "=== $1: skipped ($2)"
    record "$1" skipped 0 "$2"
}

echo "gpu_check: $([ "$SMOKE" = 1 ] && echo 'CPU smoke run' || echo 'GPU run'); output in" \
    "$OUT_DIR; budget ${BUDGET_S}s"

# a. environment
run_step env 30 5 env.txt bash "${BASH_SOURCE[0]}" --env-report

# b. kernel tests. Not -x: one failure must not hide the rest of a rare GPU run, so
# up to 10 failures are reported, each with its traceback.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --maxfail=10 -rfEs)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST+=(--timeout=90)  # a hung test fails alone instead of eating the step
fi
if [ "$SMOKE" = 1 ]; then
    run_step kernel_tests 120 5 kernel_tests.txt env -u TRITON_INTERPRET \
        MEGATRON_PACI_TEST_DEVICE=cpu "${PYTEST[@]}" tests/kernels/test_cross_entropy.py \
        -k "rejects_bad_arguments or default_block"
else
    # tests/conftest.py leaves TRITON_INTERPRET alone in this mode; it must not come in
    # from outside either, or the "GPU" run would interpret the kernels.
    run_step kernel_tests 150 30 kernel_tests.txt env -u TRITON_INTERPRET \
        MEGATRON_PACI_TEST_DEVICE=cuda "${PYTEST[@]}" tests/kernels
fi

# c. kernel benchmark: Triton vs torch eager first (no torch.compile, whose compile time
# is the unknown); the report is only written at the end, so it must finish in time.
if [ "$SMOKE" = 1 ]; then
    run_step bench_kernels 120 5 bench_kernels.txt env -u TRITON_INTERPRET \
        "$PY" scripts/bench_kernels.py --smoke --output "$OUT_DIR/kernels_gpu.md"
else
    run_step bench_kernels 120 30 bench_kernels.txt env -u TRITON_INTERPRET \
        "$PY" scripts/bench_kernels.py --no-compile --output "$OUT_DIR/kernels_gpu.md"
fi

# c2. cross-entropy peak memory, counted per tensor and read from the allocator, at
# GPT-2 Medium's tokens per micro-batch (8 x 1024) and vocabulary.
if [ "$SMOKE" = 1 ]; then
    run_step ce_memory 60 5 bench_kernels.txt env TRITON_INTERPRET=1 \
        "$PY" scripts/bench_ce_memory.py --tokens 4 --vocab 1000
else
    run_step ce_memory 60 20 bench_kernels.txt env -u TRITON_INTERPRET \
        "$PY" scripts/bench_ce_memory.py --device cuda --tokens 8192
fi

# d. MFU with the dispatcher's choice (Triton on CUDA, after the parity check).
# Micro-batch 16 (halved on out-of-memory): eager PyTorch launches a few thousand
# kernels per micro-batch, and at 8 x 1024 tokens the host could become the limit.
MFU=("$PY" scripts/bench_mfu.py)
if [ "$SMOKE" = 1 ]; then MFU+=(--smoke --peak-tflops 1); else MFU+=(--micro-batch 16); fi
run_step bench_mfu 120 30 bench_mfu.txt env -u TRITON_INTERPRET "${MFU[@]}"
if [ "$LAST_RC" != 0 ] && [ "$LAST_RC" != skipped ]; then
    # Still get a step time if it was the start-up parity check that stopped it.
    run_step bench_mfu_no_parity 90 60 bench_mfu.txt env -u TRITON_INTERPRET "${MFU[@]}" \
        --no-parity
fi

# e. the product end to end: data prep, then pretrain_gpt.py on the device with
# precision and kernels on auto (bf16 autocast and Triton on a GPU, which no CPU run
# exercises), stopped at a checkpoint and relaunched to resume.
if [ "$SMOKE" = 1 ]; then
    run_step train_gpu 120 20 train_gpu.txt bash "${BASH_SOURCE[0]}" --train-run=4,2
else
    run_step train_gpu 120 60 train_gpu.txt bash "${BASH_SOURCE[0]}" --train-run=60,30
fi

# e2. GPT-2 Medium through the trainer: MFU of what pretrain_gpt.py runs.
if [ "$SMOKE" = 1 ]; then
    run_step train_medium 120 20 train_gpu.txt bash "${BASH_SOURCE[0]}" --cpu-smoke \
        --train-medium=2,2
else
    run_step train_medium 150 90 train_gpu.txt bash "${BASH_SOURCE[0]}" --train-medium=12,16
fi

# Extras, while the budget lasts: the torch baseline for MFU, the LayerNorm/RMSNorm
# tile sweep, then torch.compile for MFU and in the kernel benchmark.
if [ "$SMOKE" = 1 ]; then
    skip_step bench_mfu_torch "--cpu-smoke: --smoke already runs the torch references"
    skip_step norm_tiles "--cpu-smoke: tests/unit/test_bench_scripts.py runs the sweep"
    skip_step bench_mfu_compile "--cpu-smoke: torch.compile takes longer than the smoke run"
    skip_step bench_kernels_compile "--cpu-smoke: --smoke never runs torch.compile"
else
    run_step bench_mfu_torch 90 60 bench_mfu.txt env -u TRITON_INTERPRET "${MFU[@]}" \
        --backend torch
    run_step norm_tiles 90 45 bench_kernels.txt env -u TRITON_INTERPRET \
        "$PY" scripts/bench_kernels.py --sweep-norm-tiles
    run_step bench_mfu_compile 150 120 bench_mfu.txt env -u TRITON_INTERPRET "${MFU[@]}" \
        --backend torch --compile
    run_step bench_kernels_compile 300 90 bench_kernels.txt env -u TRITON_INTERPRET \
        "$PY" scripts/bench_kernels.py --output "$OUT_DIR/kernels_gpu_compile.md"
fi

echo "total $((SECONDS - START))s" >>"$SUMMARY"
printf '\n=== summary (%s)\n' "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
