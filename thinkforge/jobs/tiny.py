"""A tiny Qwen2-architecture model and tokenizer, built locally, for tests and the CPU demo.

No machine here can download weights, so the project builds its own stand-in for a Qwen
base model: a byte-level BPE tokenizer (trained on a small fixed corpus, digits split into
single tokens, the Qwen chat special tokens and both families' thinking delimiters) and a
randomly initialised ``Qwen2ForCausalLM`` of a few hundred thousand parameters. Both are
saved with ``save_pretrained`` so every consumer loads them exactly like a real model:

    path = ensure_tiny_model(data_dir)                  # built once, cached, atomic
    model = AutoModelForCausalLM.from_pretrained(path)
    name_or_path = resolve_base_model(cfg.model, data_dir, registry_resolver=resolver)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkforge.contract import TINY_MODEL, TINY_MOE_MODEL

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TINY_VERSION",
    "build_tiny_model",
    "build_tiny_moe_model",
    "build_tiny_tokenizer",
    "ensure_tiny_model",
    "resolve_base_model",
]

TINY_VERSION = 1
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"

# Qwen2's pre-tokenizer pattern: \p{N} matches one digit, so numbers split into digits.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style ChatML. `enable_thinking` opens the thinking block in the generation prompt;
# `thinking_family` picks the delimiter ("s1" default, "r1"/"qwen3": <think>). Earlier
# assistant turns render their content only, as Qwen3 drops reasoning from history.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') "
    "+ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}"
    "{%- if thinking_family is defined and thinking_family in ('r1', 'qwen3') -%}"
    "{{- '<think>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>think\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS_WORDS = (
    "system user assistant think answer Answer Sum Wait Final Answer: You are a helpful "
    "assistant. The answer is Let me think step by step. So the total is Question: "
    "Solve this problem and put the final answer last. Hmm, check again. Therefore"
)


def _corpus() -> list[str]:
    """A fixed corpus: chat words plus arithmetic traces like the synthetic task's."""
    # Repeat the words so BPE merges them into whole tokens ("think", "answer", "Wait").
    # Each word also stands alone: at a line start it has no leading space ("think\n").
    lines = [_CORPUS_WORDS] * 200 + _CORPUS_WORDS.split() * 100
    for a in range(10):
        for b in range(10):
            lines.append(f"Sum: {a} {b} {a}+{b}={a + b}\nAnswer: {a + b}")
    return lines


def build_tiny_tokenizer(vocab_size: int = 400):  # -> PreTrainedTokenizerFast
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Qwen3: the <think> tags are atomic but not "special", so decoding keeps them.
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=4096
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    vocab_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
):  # -> Qwen2ForCausalLM
    """A randomly initialised Qwen2 causal LM of a few hundred thousand parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        use_sliding_window=False,
    )
    return _seeded(Qwen2ForCausalLM, config, seed)


def _seeded(model_class: Any, config: Any, seed: int) -> Any:
    """``model_class(config)`` from a forked, seeded RNG, so building a model never
    disturbs the caller's random state; generation stops at the config's eos."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def build_tiny_moe_model(
    vocab_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
):  # -> Qwen3MoeForCausalLM
    """A randomly initialised Qwen3-MoE causal LM: every layer sparse, no shared expert.

    transformers' own balancing loss is switched off (``router_aux_loss_coef=0``): the
    job's ``moe`` section decides it (``thinkforge.jobs.moe``).
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        moe_intermediate_size=hidden_size * 2,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.0,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,  # type: ignore[call-arg]  # a Qwen3 config field
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    return _seeded(Qwen3MoeForCausalLM, config, seed)


_BUILDERS = {
    TINY_MODEL: ("tiny", build_tiny_model),
    TINY_MOE_MODEL: ("tiny-moe", build_tiny_moe_model),
}


def _build_into(directory: Path, seed: int, name: str = TINY_MODEL) -> None:
    tokenizer = build_tiny_tokenizer()
    model = _BUILDERS[name][1](
        len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        seed=seed,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    info = {"name": name, "version": TINY_VERSION, "seed": seed}
    (directory / "thinkforge_tiny.json").write_text(json.dumps(info) + "\n")


def ensure_tiny_model(data_dir: str | Path, seed: int = 0, name: str = TINY_MODEL) -> Path:
    """Return data_dir/models/tiny (or tiny-moe for ``thinkforge/tiny-moe``), building it
    on first use.

    Built in a temporary sibling and renamed into place: the rename is atomic, so a reader
    never sees half a model, and when two processes race the loser discards its copy.
    """
    final = Path(data_dir).absolute() / "models" / _BUILDERS[name][0]
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        _build_into(tmp, seed, name)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


RegistryResolver = Callable[[str], str]


def resolve_base_model(
    name: str, data_dir: str | Path, registry_resolver: RegistryResolver | None = None
) -> str:
    """Map a config's ``model`` to something ``from_pretrained`` can load.

    ``thinkforge/tiny`` / ``thinkforge/tiny-moe`` -> the locally built tiny model; ``models:/name/N`` or
    ``models:/name@alias`` -> ``registry_resolver(uri)`` (the caller's MLflow lookup that
    returns a local directory); anything else (a path or a Hugging Face id) is unchanged.
    """
    if name in _BUILDERS:
        return str(ensure_tiny_model(data_dir, name=name))
    if name.startswith("models:/"):
        if registry_resolver is None:
            raise ValueError(f"cannot resolve {name!r}: no model registry is configured")
        return registry_resolver(name)
    return name
