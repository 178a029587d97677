"""The tiny model and tokenizer: build, save, reload, round trips, chat template."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from thinkforge.jobs.config import TINY_MODEL, TemplateFamily
from thinkforge.jobs.tiny import (
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_tokenizer,
    ensure_tiny_model,
    resolve_base_model,
)


def test_reloads_through_from_pretrained(tiny_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("Sum: 1 2", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize(
    "text",
    [
        "Sum: 3 5 2 7",
        "3+5=8\n8+2=10\n10+7=17",
        "<|im_start|>think\nWait, 12+9=21<|im_start|>answer\nAnswer: 21<|im_end|>",
        "<think>\nhmm</think>\n\nFinal Answer: 42<|endoftext|>",
        "Unicode too: café ∑ 数学",
    ],
)
def test_tokenizer_round_trips(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_saved_tokenizer_matches_the_built_one(tokenizer: Any) -> None:
    built = build_tiny_tokenizer()
    text = "<|im_start|>user\nSum: 10 20<|im_end|>\n<think>\n1+2=3</think>\nWait"
    assert built(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_digits_delimiters_and_words_are_single_tokens(tokenizer: Any) -> None:
    def pieces(text: str) -> list[str]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [tokenizer.decode([i]) for i in ids]

    assert pieces("1234") == ["1", "2", "3", "4"]
    assert pieces("<|im_start|>think\n") == ["<|im_start|>", "think", "\n"]
    assert pieces("<|im_start|>answer\n") == ["<|im_start|>", "answer", "\n"]
    assert pieces("<think>\n</think>\n") == ["<think>", "\n", "</think>", "\n"]
    assert pieces("Wait") == ["Wait"]


def test_think_tags_survive_skip_special_tokens(tokenizer: Any) -> None:
    ids = tokenizer("<think>\nx</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx</think>"


@pytest.mark.parametrize(
    ("kwargs", "suffix"),
    [
        ({}, "<|im_start|>assistant\n"),
        ({"enable_thinking": True}, "<|im_start|>assistant\n<|im_start|>think\n"),
        ({"enable_thinking": True, "thinking_family": "r1"}, "<|im_start|>assistant\n<think>\n"),
    ],
)
def test_generation_prompt_can_open_thinking(
    tokenizer: Any, kwargs: dict[str, Any], suffix: str
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum: 1 2"}]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kwargs
    )
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSum: 1 2<|im_end|>\n"
    assert text == head + suffix


def test_delimiters_match_the_template_families() -> None:
    assert TemplateFamily.S1.delimiters == ("<|im_start|>think\n", "<|im_start|>answer\n")
    assert TemplateFamily.R1.delimiters == ("<think>\n", "</think>\n")


def test_build_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = ensure_tiny_model(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_ensure_reuses_the_cache_and_leaves_no_temp_dirs(data_dir: Path, tiny_dir: Path) -> None:
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(data_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before
    # Other tests of the session may have built tiny-moe beside it; no temp dir is left.
    names = os.listdir(tiny_dir.parent)
    assert "tiny" in names and not [n for n in names if n.startswith(".tiny-")], names


def test_resolve_base_model(data_dir: Path, tiny_dir: Path) -> None:
    assert resolve_base_model(TINY_MODEL, data_dir) == str(tiny_dir)
    assert resolve_base_model("Qwen/Qwen2.5-32B-Instruct", data_dir) == "Qwen/Qwen2.5-32B-Instruct"
    seen = []
    resolved = resolve_base_model(
        "models:/tiny-sft@production", data_dir, registry_resolver=lambda u: seen.append(u) or "/m"
    )
    assert (resolved, seen) == ("/m", ["models:/tiny-sft@production"])
    with pytest.raises(ValueError, match="no model registry"):
        resolve_base_model("models:/x/1", data_dir)
