"""Models and tokenizer for the trainer: causal LMs (policy, reference, DPO) and value-head models (critic, reward).

Usage:
    tokenizer = build_tokenizer()                                   # the byte-level tokenizer shipped in the package
    policy = load_causal_lm("tiny", dtype="fp32", gradient_checkpointing=False, trainable=True)
    reference = load_causal_lm("runs/x/sft", dtype="bf16", trainable=False)   # frozen: eval mode, no gradients
    critic = ValueHeadModel.from_pretrained("runs/x/sft")           # backbone of a causal LM + a scalar head
    values_BT = critic(input_ids=..., position_ids=..., use_cache=False)   # one scalar per token

`"tiny"` builds a small Llama-style model from `tiny_model_config()` with random weights and the shipped tokenizer;
nothing is downloaded. Any other name is a local folder or a Hub name handed to `from_pretrained`.
Packed micro-batches go through `rto_fast.attention.packed_forward`, which works with both kinds of model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as transformers_logging

from ..tasks import credit as credit_task
from . import extras
from .attention import forward_parameters, model_attn_implementation, unwrapped
from .extras import PEFT_MISSING
from .layout import VALUE_HEAD_FILE
from .lora import add_adapters

TINY = "tiny"
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# Tokenizers of the bundled tasks, built in code (model.tokenizer names them).
TASK_TOKENIZERS = {"credit": credit_task.build_tokenizer}

# HH-RLHF-style turns, so that chat-message data and HH transcripts render alike. Assistant turns end with <eos>,
# which makes the rendering of a prompt with add_generation_prompt=True a prefix of the rendering with the answer.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\n\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------- tokenizer

def _byte_to_char() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that the `tokenizers` ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def byte_level_tokenizer(merges: list[tuple[str, str]] = ()):
    """A `tokenizers` byte-level BPE: token id = byte value (0-255), then one token per merge (in `_byte_to_char`'s
    characters), then <pad>, <bos>, <eos>. No regex split: text is merged as one piece."""

    vocab = {char: byte for byte, char in _byte_to_char().items()}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def make_byte_tokenizer(folder: str | os.PathLike) -> None:
    """Write the byte-level tokenizer (no merges) to `folder`: token id = byte value (0-255), then <pad>=256,
    <bos>=257, <eos>=258. This is how rto_fast/assets/tokenizer/ was made; a test checks the shipped files still
    match."""
    tokenizer = byte_level_tokenizer()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer shipped in the package (path None or 'tiny'), a bundled task's own ('credit'), else
    `AutoTokenizer.from_pretrained(path)`.

    A tokenizer without a pad token gets its eos token as pad (packed batches never pad; generation needs one)."""

    if path is None or str(path) == TINY:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    elif str(path) in TASK_TOKENIZERS:
        tokenizer = TASK_TOKENIZERS[str(path)]()
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------------- models

def tiny_model_config(vocab_size: int | None = None, tokenizer=None, **overrides):
    """A small Llama-style config (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128) sized to `tokenizer` (its
    vocabulary and special tokens; default: the shipped byte-level tokenizer)."""

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def check_model_source(path: str) -> None:
    """Fail early with one clear line when `path` is neither 'tiny', a model folder nor something like a Hub name."""
    if path == TINY:
        return
    local = Path(path).expanduser()
    if local.exists():
        base = adapter_base(path)
        if base is not None:  # PEFT adapters: the base they adapt must be a model source itself
            check_model_source(base)
            return
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path!r} has no config.json (nor PEFT's adapter_config.json)")
        try:
            config = AutoConfig.from_pretrained(str(local))
        except Exception:  # noqa: BLE001 - a config only its own code reads (remote code): loading will tell
            return
        check_attention_interface(config, path)
        return
    # A Hub name is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
    if looks_local or not path.strip():
        raise FileNotFoundError(f"model path {path!r} does not exist (and is not a Hub name like 'org/model')")


def adapter_base(path: str) -> str | None:
    """For a local folder of PEFT (LoRA) adapters without a model of its own (adapter_config.json, no config.json;
    e.g. an SFT adapter, or an rto_fast checkpoint's model/ trained with model.lora_rank): the model they adapt, which
    loading merges them into. None for anything else. ValueError when the folder does not name a usable base."""
    local = Path(path).expanduser()
    if not (local / "adapter_config.json").is_file() or (local / "config.json").is_file():
        return None
    if not extras.peft_available():
        raise ValueError(f"model folder {path!r} holds PEFT adapters: {PEFT_MISSING}")
    base = json.loads((local / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or base == TINY:
        raise ValueError(f"model folder {path!r} holds PEFT adapters whose adapter_config.json names no base model "
                         "(base_model_name_or_path) that can be loaded; merge them into their base first")
    return str(base)


def _merge_adapters_from(model: nn.Module, path: str) -> nn.Module:
    """`model` (the base of the adapters in folder `path`) with those adapters merged in: a plain model again."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path).merge_and_unload()


def check_attention_interface(config, name: str) -> None:
    """ValueError when the causal LM class of `config` does not take the attention functions transformers lets a
    trainer plug in (its `_supports_attention_backend` is False: Falcon, Bloom, MPT): packed sequences need one,
    and such a class fails while being built with it."""

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and getattr(model_class, "_supports_attention_backend", True) is False:
        raise ValueError(f"model {name!r}: {model_class.__name__} does not take plug-in attention functions "
                         "(transformers' attention interface), which packed sequences need; models on it include "
                         "Llama, Qwen, Mistral, Gemma, GPT-NeoX, GPT-2, OPT and Phi")


def _check_source_and_interface(path: str) -> str | None:
    """Check `path` as a model source; returns the base model when it is a folder of PEFT adapters (`adapter_base`)."""
    check_model_source(path)  # a local folder's attention interface is checked there
    base = adapter_base(path)
    model_path = base or path
    if not Path(model_path).expanduser().exists():
        check_attention_interface(AutoConfig.from_pretrained(model_path), model_path)
    return base


def _attention_implementation() -> str:
    return model_attn_implementation()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (transformers' activation checkpointing)."""
    if isinstance(model, ValueHeadModel):
        model = model.backbone
    # Non-reentrant checkpointing works with frozen embeddings and with inputs that need no gradient.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability inside `model` to 0: `nn.Dropout` modules and the float attributes named
    `*dropout*` / `*pdrop*` that attention layers pass to their attention function (Llama's `attention_dropout`,
    OPT's `dropout`), and LayerDrop rates (`*layerdrop*`, OPT's skipped layers). Returns how many were nonzero. The
    config is left as it was (a saved model keeps its own)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and value and any(part in name for part in ("dropout", "pdrop", "layerdrop")):
                setattr(module, name, 0.0)
                changed += 1
    return changed


def _prepare(model: nn.Module, gradient_checkpointing: bool, trainable: bool, keep_dropout: bool = False,
             lora=None) -> nn.Module:
    if trainable:
        model.train()
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if not keep_dropout:
            disable_dropout(model)
        if lora is not None:  # after disable_dropout: model.lora_dropout is the user's own choice
            add_adapters(model, lora)
    else:
        model.eval()
        model.requires_grad_(False)
    # Packed streams must never go through the KV cache (DESIGN.md "Traps"): make it off by default too.
    model.config.use_cache = False
    return model


def trainable_copy(model: nn.Module, device: torch.device, gradient_checkpointing: bool = False,
                   keep_dropout: bool = False) -> nn.Module:
    """A trained model that starts as a copy of a frozen one (pi_0 = pi_ref with the random tiny weights), prepared as
    a loaded trained model is. (With LoRA no copy is made: the reference is the policy with its adapters off.)"""
    return _prepare(copy.deepcopy(model).requires_grad_(True).to(device), gradient_checkpointing, True, keep_dropout)


def load_causal_lm(path_or_tiny: str = TINY, dtype: str | torch.dtype = "fp32", gradient_checkpointing: bool = False,
                   trainable: bool = True, vocab_size: int | None = None, keep_dropout: bool = False, lora=None,
                   tokenizer=None):
    """AutoModelForCausalLM for the policy, reference or DPO model.

    `"tiny"` builds `tiny_model_config()` for `tokenizer` (default: the shipped one) with random weights (seed the
    RNG first for reproducible weights);
    anything else goes to `from_pretrained`. Frozen models (`trainable=False`) are in eval mode with
    requires_grad False; trained ones have their dropout set to 0 unless `keep_dropout` (`disable_dropout`) and, given
    `lora` (`rto_fast.lora.LoraSettings`), train LoRA adapters only. The attention implementation is the one
    `rto_fast.attention` chose for this process."""

    dtype = torch_dtype(dtype)
    attn = _attention_implementation()
    if path_or_tiny == TINY:
        config = tiny_model_config(vocab_size, tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        base = _check_source_and_interface(path_or_tiny)
        model = AutoModelForCausalLM.from_pretrained(base or path_or_tiny, dtype=dtype, attn_implementation=attn)
        if base is not None:
            model = _merge_adapters_from(model, path_or_tiny)
    return _prepare(model, gradient_checkpointing, trainable, keep_dropout, lora)


def _load_backbone(auto_class, path: str, dtype: torch.dtype, attn: str):
    """AutoModel from a causal LM or value-head folder. Dropping a causal LM's head is expected, so transformers'
    load report (which lists it as unexpected) is silenced; any other missing or unexpected weight is logged."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        backbone, info = auto_class.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                    output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(previous)
    head_prefixes = ("lm_head.", "embed_out.", "output.", "score.", "v_head.")
    unexpected = [key for key in info.get("unexpected_keys", []) if not key.startswith(head_prefixes)]
    missing = list(info.get("missing_keys", []))
    if unexpected or missing:
        logging.getLogger(__name__).warning("backbone from %s: missing weights %s, unexpected weights %s", path,
                                            missing[:8], unexpected[:8])
    return backbone


class ValueHeadModel(nn.Module):
    """A causal LM's backbone (`AutoModel`) plus a scalar head read at every token: the critic and the reward model.

    `forward(input_ids, position_ids=..., use_cache=False)` returns values of shape (B, T) in float32.
    `save_pretrained(folder)` writes the backbone (loadable with `AutoModel.from_pretrained`) and
    `value_head.safetensors`; `from_pretrained(folder)` reads both, or starts a fresh zero-initialised head on the
    backbone of any causal LM folder (e.g. the SFT model)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden_size = self.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden_size, 1, dtype=next(backbone.parameters()).dtype)
        # A zero head starts every value at 0: the critic's first PPO losses are not dominated by random values.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs.setdefault("use_cache", False)
        hidden_BTD = self.backbone(input_ids=input_ids, **kwargs).last_hidden_state
        return self.value_head(hidden_BTD.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        folder = Path(folder)
        self.backbone.save_pretrained(folder, **kwargs)
        head = {name: tensor.detach().contiguous().cpu() for name, tensor in self.value_head.state_dict().items()}
        save_file(head, str(folder / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path_or_tiny: str = TINY, dtype: str | torch.dtype = "fp32",
                        gradient_checkpointing: bool = False, trainable: bool = True,
                        vocab_size: int | None = None, keep_dropout: bool = False, lora=None,
                        tokenizer=None) -> "ValueHeadModel":
        """Backbone from a causal LM or value-head folder ('tiny': random tiny Llama); head from
        value_head.safetensors when the folder has one, else zeros."""
        dtype = torch_dtype(dtype)
        attn = _attention_implementation()
        if path_or_tiny == TINY:
            backbone = AutoModel.from_config(tiny_model_config(vocab_size, tokenizer), dtype=dtype,
                                             attn_implementation=attn)
        else:
            base = _check_source_and_interface(path_or_tiny)
            backbone = _load_backbone(AutoModel, base or path_or_tiny, dtype, attn)
            if base is not None:
                backbone = _merge_adapters_from(backbone, path_or_tiny)
        model = cls(backbone)
        head_file = Path(path_or_tiny) / VALUE_HEAD_FILE
        if path_or_tiny != TINY and head_file.is_file():
            state = load_file(str(head_file))
            model.value_head.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()})
        return _prepare(model, gradient_checkpointing, trainable, keep_dropout, lora)
