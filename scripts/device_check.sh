#!/usr/bin/env bash
# One GPU check (H100 / H200, no network; jax, torch, transformers, trl installed, `pip install --no-deps -e .`),
# under 8 minutes, every part under its own timeout, failing loudly on the first error:
#   1. the GPU's name (nvidia-smi) and the library versions
#   2. bench.py compare: TRL's GKDTrainer step vs ours at Qwen2-7B -> Qwen2-0.5B shapes (bf16, batch 8,
#      128 prompt + 128 new tokens), lmbda 0 and 1, each in its own process, then the ratios
#   3. bench.py quantized_step: the trainer's step with a Qwen2-7B-shaped teacher kept in Q4_K beside a
#      float32-master Qwen2-0.5B student (bf16 compute, embeddings frozen, batch 8, 128 + 128): time and peak
#   4. bench.py step: our trainer-shaped step (the teacher cut to an 8-layer student, as the trainer builds it)
#      at the shapes of docs/BENCHMARKS.md's "Distillation step" table, for its GPU column
# Every JSON line is printed and appended, with date, device and command, to $OUT/device_check.jsonl
# ($OUT set) or docs/device_check.jsonl.
#
#   bash scripts/device_check.sh
#   DEVICE_CHECK_TINY=1 bash scripts/device_check.sh     # CPU smoke run: smollm2-135m -> 2 layers, batch 2, 16+16
#
# Overrides: PYTHON (python), COMPARE_ARGS, QUANT_ARGS, STEP_ARGS, COMPARE_TIMEOUT (260 s), QUANT_TIMEOUT (75 s),
# STEP_TIMEOUT (60 s; the CPU smoke path: 150 s and 180 s for the last two), each killed 5 s after its limit; with nvidia-smi's 20 s and the imports' 60 s no run passes
# 8 minutes and a quarter.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if [[ "${DEVICE_CHECK_TINY:-0}" == 1 ]]; then
    COMPARE_ARGS=${COMPARE_ARGS:---teacher-preset smollm2-135m --student-layers 2 --batch 2 --prompt-len 16 --new 16 --dtype float32 --repeats 2}
    QUANT_ARGS=${QUANT_ARGS:---teacher-preset smollm2-135m --student-preset smollm2-135m --qtype Q4_0 --dtype float32 --batch 2 --prompt-len 16 --new 16 --repeats 1}
    STEP_ARGS=${STEP_ARGS:---teacher-preset smollm2-135m --student-layers 2 --batch 2 --prompt-len 16 --new 16 --repeats 1}
    # a shared 2-core CPU (CI runs this beside other tests) compiles slower than a GPU host: wider limits
    QUANT_TIMEOUT=${QUANT_TIMEOUT:-150}
    STEP_TIMEOUT=${STEP_TIMEOUT:-180}
else
    COMPARE_ARGS=${COMPARE_ARGS:---teacher-preset qwen2-7b --student-preset qwen2-0.5b --batch 8 --prompt-len 128 --new 128 --dtype bfloat16 --repeats 3}
    QUANT_ARGS=${QUANT_ARGS:---teacher-preset qwen2-7b --student-preset qwen2-0.5b --qtype Q4_K --dtype bfloat16 --freeze embed --batch 8 --prompt-len 128 --new 128 --repeats 3}
    STEP_ARGS=${STEP_ARGS:---teacher-preset smollm2-135m --student-layers 8 --batch 8 --prompt-len 32 --new 64 --repeats 3}
fi
RESULTS=${OUT:-docs}/device_check.jsonl
mkdir -p "$(dirname "$RESULTS")"
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if command -v nvidia-smi >/dev/null; then
    DEVICE=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
elif [[ "${DEVICE_CHECK_TINY:-0}" == 1 ]]; then
    DEVICE="cpu ($(nproc) cores)"
else
    echo "device_check: no nvidia-smi, so no GPU; DEVICE_CHECK_TINY=1 runs the CPU smoke path" >&2
    exit 1
fi
echo "device: $DEVICE"
timeout 60 "$PYTHON" -c "import jax, torch, transformers, trl; print('jax', jax.__version__, jax.devices(), \
'| torch', torch.__version__, torch.cuda.is_available(), '| transformers', transformers.__version__, '| trl', \
trl.__version__)"

# run SECONDS ARGS...: the command under a timeout; its JSON lines printed and appended to $RESULTS, annotated
run() {
    local limit=$1; shift
    echo "+ $*" >&2
    timeout --kill-after=5 "$limit" "$@" | "$PYTHON" -c '
import datetime, json, sys
meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": sys.argv[1], "command": sys.argv[3]}
with open(sys.argv[2], "a") as out:
    for line in sys.stdin:
        print(line, end="", flush=True)
        if line.startswith("{"):
            out.write(json.dumps({**json.loads(line), **meta}) + "\n")
' "$DEVICE" "$RESULTS" "$*"
}

start=$(date +%s)
# shellcheck disable=SC2086  # the *_ARGS are word lists
run "${COMPARE_TIMEOUT:-260}" "$PYTHON" scripts/bench.py compare $COMPARE_ARGS
# shellcheck disable=SC2086
run "${QUANT_TIMEOUT:-75}" "$PYTHON" scripts/bench.py quantized_step $QUANT_ARGS
# shellcheck disable=SC2086
run "${STEP_TIMEOUT:-60}" "$PYTHON" scripts/bench.py step $STEP_ARGS
echo "device_check: done in $(( $(date +%s) - start )) s; results appended to $RESULTS"
