#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, in the order of what matters most when time is short:
#   1. the kernel tests with the Triton kernels compiled natively (the interpreter hides compile errors),
#   2. the rest of the suite (trainer stages on the GPU), while the tiny pipeline trains on the GPU beside it,
#   3. the benchmarks: bench_logprobs, tune_logprobs (kernel launch settings), bench_rl_step (against TRL 1.12,
#      Pythia-410M-shaped with Pythia's vocabulary, one iteration of each side profiled), bench_generation,
#      bench_gae_ppo, then bench_rl_step with the fused output layer (rl_step_cuda_fused.md) and with it,
#      activation checkpointing on both sides and our frozen models offloaded (rl_step_cuda_lean.md), then the
#      precision setups that keep small updates (rl_step_cuda_stochastic_rounding.md, rl_step_cuda_master_weights.md).
# Each step has its own time limit, so a slow or failing step never starves the rest; pytest is interrupted
# (SIGINT) at its limit so that it still prints what failed. The limits add up to more than one 600 s call: ONLY
# names the steps to run (the rest are skipped), so the suite can be split over calls, and BUDGET (seconds since
# the suite started) skips every step whose limit would end past it, so a call returns before its own timeout
# with every finished step's results.
#
#   bash bench/run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]
#   ONLY="bench_rl_step bench_rl_step_fused" bash bench/run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]
#   BUDGET=540 ONLY=first bash bench/run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]   (one 600 s call: see FIRST below)
#
# Results land in bench/results/*_cuda*.md (copied into OUT_DIR at the end), each step's log and a summary in
# OUT_DIR.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: run_gpu_suite.sh OUT_DIR [TRL_1_12_PATH]}
trl_path=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# What one 600 s call should measure first when it is the only one: kernels compiled natively, the op benchmark and
# its launch-setting sweep, the RL iteration against TRL, then what fits.
FIRST="tests_kernels bench_logprobs tune_logprobs bench_rl_step bench_gae_ppo bench_optimizer bench_rl_step_sr"
[ "${ONLY:-}" = first ] && ONLY=$FIRST
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, report the exit status
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $(echo $ONLY) " != *" $name "* ]]; then return 0; fi
    if [ -n "${BUDGET:-}" ] && [ $((SECONDS + limit)) -gt "$BUDGET" ]; then
        echo "[$name] skipped: its $limit s limit would end past BUDGET=$BUDGET s (at $SECONDS s now)" \
            | tee -a "$out/summary.log"
        return 0
    fi
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.log"
    tail -n 5 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/summary.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/summary.log"

seed=$RANDOM$RANDOM
echo "test seed: RTO_FAST_TEST_SEED=$seed" | tee -a "$out/summary.log"
export RTO_FAST_TEST_SEED=$seed
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))" || echo "")
kernel_tests="tests/test_logprobs.py tests/test_rewards.py tests/test_gae_ppo.py tests/test_ops_contract.py tests/test_drop_in.py tests/test_reference.py tests/test_optim.py"
pytest_options="-q -p no:cacheprovider --timeout 120 $workers"
step tests_kernels 90 python3 -m pytest $kernel_tests $pytest_options
# The trainer tests and a short tiny-pipeline run share the GPU (neither is timed).
step train_tiny 150 python3 -m rto_fast.train --config configs/tiny.yaml runtime.device=cuda \
    runtime.output_dir=/tmp/rto_fast_tiny_cuda sft.epochs=1 dpo.epochs=1 rl.iterations=6 rl.eval_every=3 &
ignored=$(for f in $kernel_tests; do printf -- "--ignore=%s " "$f"; done)
step tests_rest 130 python3 -m pytest tests $ignored $pytest_options -k "not test_wheel_contents"
wait

step bench_logprobs 50 python3 bench/bench_logprobs.py --device cuda
# Launch settings of the log-prob kernels (block, warps, split) against the defaults, per shape.
step tune_logprobs 150 python3 bench/tune_logprobs.py
trl_args=()
[ -n "$trl_path" ] && trl_args=(--trl-path "$trl_path")
# Iteration 4 of each side is profiled (phases, top kernels: appended to the report) and not timed.
step bench_rl_step 160 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 4 --profile 4 "${trl_args[@]}"
# Generation alone: model.generate vs rto_fast's decode loop, eager and as a CUDA graph (what caps the iteration).
step bench_generation 150 python3 bench/bench_generation.py --device cuda --model pythia-410m --batch 64 \
    --new-tokens 256 --repeats 3
step bench_gae_ppo 40 python3 bench/bench_gae_ppo.py --device cuda --skip-compile
# One AdamW step of Pythia-410M-shaped parameters per model.bf16_optimizer (the stochastic-rounding Triton kernel too).
step bench_optimizer 40 python3 bench/bench_optimizer.py --device cuda
# The same iteration with log-probs from the output layer's input (model.fused_output_layer: no (tokens, vocabulary)
# logits held), against the run above.
step bench_rl_step_fused 130 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 --fused-output-layer --output bench/results/rl_step_cuda_fused.md \
    "${trl_args[@]}"
# The DPO stage against TRL's DPOTrainer (needs trl and datasets importable, e.g. from the TRL path).
step bench_dpo_step 120 env PYTHONPATH="${trl_path}${PYTHONPATH:+:$PYTHONPATH}" python3 bench/bench_train_step.py \
    --stage dpo --device cuda --model pythia-410m
# Memory-lean: the fused output layer, activation checkpointing (on both sides) and rto_fast's frozen models offloaded
# to host memory (rl.offload_frozen_models; TRL has no such option).
step bench_rl_step_lean 130 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 --fused-output-layer --gradient-checkpointing --offload-frozen \
    --output bench/results/rl_step_cuda_lean.md "${trl_args[@]}"
# The setups that keep AdamW's small updates: rto_fast's bf16 weights with stochastic rounding (8 bytes per trained
# parameter) against TRL's float32 weights under bf16 autocast (16), then rto_fast's float32 master weights (16).
step bench_rl_step_sr 130 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 --bf16-optimizer stochastic_rounding \
    --output bench/results/rl_step_cuda_stochastic_rounding.md "${trl_args[@]}"
step bench_rl_step_master 130 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 --bf16-optimizer master_weights \
    --output bench/results/rl_step_cuda_master_weights.md "${trl_args[@]}"
# LoRA adapters (rank 16) on both sides: TRL's peft_config (its reference the policy with the adapter off) against
# model.lora_rank (the same). Needs peft importable (carry its wheel).
step bench_rl_step_lora 130 python3 bench/bench_rl_step.py --device cuda --model pythia-410m --rollout-batch 64 \
    --response-length 256 --iterations 3 --lora 16 "${trl_args[@]}"

cp bench/results/*_cuda*.md "$out/" 2>/dev/null
cat "$out/summary.log"
