"""rto_fast: fast Reinforced Token Optimization (RTO) for RLHF.

`import rto_fast.ops` for the fused ops; `python -m rto_fast.train --config FILE` for the trainer.
"""

__version__ = "0.1.0"
