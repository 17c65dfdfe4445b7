#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, in the order of what matters most when time is short:
#   1. the kernel benchmarks (bench_logprobs, bench_gae_ppo),
#   2. the whole test suite with the Triton kernels compiled natively (the interpreter hides compile errors),
#      while the tiny pipeline trains on the GPU beside it,
#   3. the RL-iteration comparison with TRL (bench_rl_step, Pythia-410M-shaped).
# Each step has its own time limit, so a slow or failing step never starves the rest.
#
#   bash bench/run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]
#
# Results land in bench/results/*_cuda.md (copied to OUT_DIR) and each step's log in OUT_DIR.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]}
trl_path=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, report the exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.log"
    tail -n 5 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/summary.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/summary.log"

step bench_logprobs 130 python3 bench/bench_logprobs.py --device cuda
step bench_gae_ppo 60 python3 bench/bench_gae_ppo.py --device cuda

# The tests and a short tiny-pipeline run share the GPU (neither is timed); tests spread over CPU workers, which
# mostly compile kernels.
seed=$RANDOM$RANDOM
echo "test seed: RTO_FAST_TEST_SEED=$seed" | tee -a "$out/summary.log"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step train_tiny 150 python3 -m rto_fast.train --config configs/tiny.yaml runtime.device=cuda \
    runtime.output_dir=/tmp/rto_fast_tiny_cuda rl.iterations=10 rl.eval_every=5 &
RTO_FAST_TEST_SEED=$seed step tests 160 python3 -m pytest tests -q --maxfail 40 --timeout 150 $workers -p no:cacheprovider \
    -k "not test_wheel_contents"
wait

trl_args=()
[ -n "$trl_path" ] && trl_args=(--trl-path "$trl_path")
step bench_rl_step 150 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 "${trl_args[@]}"

cp bench/results/*_cuda.md "$out/" 2>/dev/null
cat "$out/summary.log"
