#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (one H100), from the repo root:
#
#     bash benchmarks/gpu.sh
#
# Everything goes to stdout; each step's output also goes to RESULTS/<step>.log, and the JSON results of the
# benchmarks to RESULTS/*.json, where RESULTS is "$OUT" when that is set (the device tool brings back what is
# under it) and a temporary folder otherwise. Every step runs under `timeout` and within one overall budget
# (GPU_SH_BUDGET_S, default 500 s, well under 9 minutes): a hang costs its step, not the run; a failed step is
# reported and the next one runs. Exit status: 0 all steps passed, 1 some step failed or timed out,
# 2 no CUDA device visible to torch, 3 missing Python packages that could not be installed.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${GPU_SH_BUDGET_S:-500}
WORK=$(mktemp -d /tmp/llmcycle-gpu.XXXXXX)
RESULTS=${OUT:-$WORK/results}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the whole transcript is in gpu.log before exit
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's llmcycle, installed or not
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # every model here is a local directory; never wait on the hub
FAILED=()

# step NAME TIMEOUT_S CMD...: run CMD with at most TIMEOUT_S seconds (less if the budget is nearly spent),
# its output to stdout and RESULTS/NAME.log; record a failure. `timeout` kills the command's whole process
# group, servers the benchmarks started included.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped, the ${BUDGET} s budget is spent"
        FAILED+=("$name(skipped)")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo
    echo "== $name (at ${SECONDS} s, timeout ${limit} s): $*"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    ((rc == 0)) || FAILED+=("$name(exit $rc)")
    return "$rc"
}

# 1. The machine: driver, GPU, torch's CUDA build. Proves torch sees the GPU; nothing else is worth running
#    without it.
step nvidia-smi 30 nvidia-smi
step versions 60 python -c '
import sys, torch, torch.distributed
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU 0:", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.1f} GiB | sm_{p.major}{p.minor}",
          "| bf16", torch.cuda.is_bf16_supported(), "| NCCL", torch.distributed.is_nccl_available(),
          "| devices", torch.cuda.device_count())
'
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch.cuda.is_available() is False: no CUDA device visible to this torch (a CPU-only build, or no" \
         "driver). Install a CUDA build of torch; nothing else runs."
    exit 2
fi

# 2. Python packages: llmcycle's own dependencies and the test/benchmark ones (transformers, pytest). Installs
#    `.[dev]` only when something is missing (torch with CUDA is assumed present; pip keeps it).
MODULES="transformers pytest numpy tokenizers safetensors yaml jinja2 tqdm zstandard xxhash ftfy regex py3langid
pyarrow resiliparse mwparserfromhell fastapi uvicorn prometheus_client httpx"
missing() { python -c "import importlib.util as u, sys; m = [n for n in sys.argv[1:] if u.find_spec(n) is None]; print(*m)" $MODULES; }
if [ -n "$(missing)" ]; then
    echo "missing: $(missing); installing .[dev]"
    step install 180 env PIP_DEFAULT_TIMEOUT=15 python -m pip install -q -e '.[dev]'
    if [ -n "$(missing)" ]; then
        echo "still missing after pip: $(missing) (no package index reachable?); the steps need them"
        exit 3
    fi
else
    echo "== packages: all present"
fi

# 3. The CUDA tests (tests/test_cuda.py): bf16 autocast training through the training session, the fused
#    AdamW the trainer builds, flash-attention eligibility of our attention (forward and backward, against the
#    math backend), the serving engine on CUDA against transformers' greedy generate with a mixed
#    prefill/decode step, and the NCCL process group of torchrun runs. Must pass with no test skipped.
step test_cuda 180 python -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider \
    --junitxml="$RESULTS/test_cuda.xml"
if grep -qE '[0-9]+ skipped' "$RESULTS/test_cuda.log"; then
    echo "WARNING: some CUDA tests were skipped (reasons above): they proved nothing here"
fi

# 4. The default lifecycle on the GPU recipe, shortened (400 pre-training steps instead of 2000, 60 SFT and
#    DPO steps, two quantized variants, small eval / serve / improve samples): every stage of `llmcycle run`
#    (data -> pretrain -> sft -> dpo -> optimize -> quantize -> eval -> serve -> improve -> report) runs with
#    the device picked by the code (CUDA, bf16 autocast) and finishes. Its numbers are a smoke test, not a
#    trained model.
RUNS=$WORK/runs
step lifecycle 180 python -m llmcycle run recipes/gpu.yaml name=gpu-short "runs_dir=$RUNS" \
    pretrain.train.max_steps=400 pretrain.eval.every=200 pretrain.eval.sample_every=0 \
    pretrain.checkpoint.every=200 sft.train.max_steps=60 dpo.train.max_steps=60 \
    'quantize.variants=[int8,int4-gptq]' quantize.calibration_samples=16 eval.limit=64 serve.requests=16 \
    improve.prompts=16 improve.samples=2 improve.ab_requests=32 improve.users=8 improve.gate_limit=32
if [ -d "$RUNS/gpu-short" ]; then
    mkdir -p "$RESULTS/lifecycle"
    # the records (stage.json, serve.json, eval/*.json, pretrain/metrics.jsonl, report.md), no weights
    (cd "$RUNS/gpu-short" && find . -maxdepth 2 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) \
        -size -2M -exec cp --parents {} "$RESULTS/lifecycle/" \;)
    [ -f "$RUNS/gpu-short/report.md" ] && sed -n 1,60p "$RUNS/gpu-short/report.md"
fi

# 5. Pre-training throughput and MFU against transformers' LlamaForCausalLM, eager: same weights, batch, loss
#    and fused AdamW on the GPU; bf16 autocast and fp32 (TF32 off, torch's default); MFU against the matmul
#    peak measured on this GPU in the same run. 32 x 1024 tokens per step: a 6.8M-parameter model is tiny
#    for an H100, so this measures per-step overhead as much as kernels.
step train_eager 100 python benchmarks/train_throughput.py --device cuda --dtype both --no-compile \
    --batch 32 --seq 1024 --steps 20 --warmup 3 --json "$RESULTS/train_throughput_eager.json"

# 6. Online serving against transformers on the same GPU: `llmcycle serve --device cuda` under the
#    vLLM-bench-like client (64 prompts of 128 -> 128 tokens, 16 in flight: TTFT, TPOT, throughput) and
#    transformers' greedy generate in fp32 (static batch 16 and one at a time); batch-1 decode against the
#    GPU memory bandwidth bound.
step serve 150 python benchmarks/serve.py --device cuda --json "$RESULTS/serve.json"

# 7. The same training comparison with torch.compile on both sides (bf16): what the GPU gives once launch
#    overhead is fused away. Last: compiling is the slowest and least certain step.
step train_compile 200 python benchmarks/train_throughput.py --device cuda --dtype bf16 --compile \
    --batch 32 --seq 1024 --steps 20 --warmup 3 --json "$RESULTS/train_throughput_compile.json"

echo
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null || true
echo "== done in ${SECONDS} s; results in $RESULTS"
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
