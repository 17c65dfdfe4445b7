"""Names of the folders and files a run writes (under runtime.output_dir):

    config.yaml, metrics.jsonl, train.log, summary.md, plots/<stage>.png
    <stage>/model/                 the stage's output model (save_pretrained; + value_head.safetensors for a
                                   value-head model); RL stages also <mode>/critic/
    <stage>/checkpoints/step-XXXXXXXX/   atomic checkpoints (rto_fast.trainer.checkpoint)
    pairs/train.jsonl, test.jsonl, pairs.json   the pairs stage's sampled preference pairs
    eval/win_rates.json, win_rates.md, samples.jsonl
"""

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
CRITIC_DIR = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"
PAIRS_DIR = "pairs"
EVAL_DIR = "eval"
WIN_RATES_JSON = "win_rates.json"  # in EVAL_DIR; the summary reads it
