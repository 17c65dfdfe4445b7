"""Optional dependencies: whether each is installed, and how to install it (imported only where used)."""

from __future__ import annotations

import importlib.util

PEFT_MISSING = "LoRA adapters need peft: pip install 'rto_fast[lora]' (or pip install peft)"


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None
