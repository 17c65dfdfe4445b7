"""The trainer: SFT, pairs, DPO, reward model, the RL stages (RTO, PPO, DPPO) and evaluation over Hugging Face models,
with packed sequences, one training loop and DeepSpeed beyond one GPU. Entry points: `python -m rto_fast.train` and
`python -m rto_fast.diagnose`; it reaches the kernels only through `rto_fast.ops`."""
