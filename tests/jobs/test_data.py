"""Records -> token ids and labels: exact boundaries per format and template family."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from thinkforge.jobs.config import DatasetFormat, TemplateFamily, parse_record
from thinkforge.jobs.data import (
    IGNORE_INDEX,
    collate,
    dataset_sha256,
    encode_examples,
    ensure_pad_token,
    load_examples,
    pack,
    tokenize_example,
)
from thinkforge.jobs.synthetic import generate, write_jsonl

PROMPT = ["<|im_start|>", "user", "\n", "Sum", ":", " ", "1", " ", "2", "<|im_end|>", "\n"]
ASSISTANT = ["<|im_start|>", "assistant", "\n"]
TRACE = ["1", "+", "2", "=", "3", "\n"]
S1_COMPLETION = [
    *["<|im_start|>", "think", "\n", *TRACE, "<|im_start|>", "answer", "\n"],
    *["Answer", ":", " ", "3", "<|im_end|>"],
]
R1_COMPLETION = ["<think>", "\n", *TRACE, "</think>", "\n", "3", "<|im_end|>"]

RECORDS = {
    DatasetFormat.S1K: {"question": "Sum: 1 2", "thinking_trajectories": ["1+2=3"], "attempt": "3"},
    DatasetFormat.LIMO: {"question": "Sum: 1 2", "solution": "1+2=3", "answer": "3"},
    DatasetFormat.CHAT: {
        "messages": [
            {"role": "user", "content": "Sum: 1 2"},
            {"role": "assistant", "content": "3", "reasoning_content": "1+2=3"},
        ]
    },
}


def split(tokenizer: Any, example: Any) -> tuple[list[str], list[str]]:
    """(masked pieces, trained pieces), checking the mask is one prompt/completion cut."""
    pieces = [tokenizer.decode([i]) for i in example.input_ids]
    trained = [x != IGNORE_INDEX for x in example.labels]
    cut = trained.index(True)
    assert all(trained[cut:]), "labels must cover one contiguous completion"
    assert example.labels[cut:] == example.input_ids[cut:]
    return pieces[:cut], pieces[cut:]


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize(
    ("family", "completion"),
    [
        (TemplateFamily.S1, S1_COMPLETION),
        (TemplateFamily.R1, R1_COMPLETION),
        (TemplateFamily.QWEN3, R1_COMPLETION),
    ],
)
def test_exact_token_boundaries(
    tokenizer: Any, fmt: DatasetFormat, family: TemplateFamily, completion: list[str]
) -> None:
    example = tokenize_example(parse_record(RECORDS[fmt], fmt), tokenizer, family)
    assert split(tokenizer, example) == (PROMPT + ASSISTANT, completion)


def test_chat_history_and_system_turns_are_masked(tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sum: 1 2"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "Sum: 1 2"},
            {"role": "assistant", "content": "Answer: 3", "reasoning_content": "1+2=3"},
        ]
    }
    example = tokenize_example(parse_record(record), tokenizer, TemplateFamily.S1)
    masked, trained = split(tokenizer, example)
    assert "".join(masked).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "".join(masked).count("<|im_start|>assistant\n") == 2
    assert trained == S1_COMPLETION  # "Answer:" already there: not added twice


def test_chat_without_reasoning_still_has_both_delimiters(tokenizer: Any) -> None:
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "3"}]
    }
    _, trained = split(
        tokenizer, tokenize_example(parse_record(record), tokenizer, TemplateFamily.R1)
    )
    assert trained == ["<think>", "\n", "</think>", "\n", "3", "<|im_end|>"]


def test_template_that_opens_thinking_is_not_doubled(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    )
    example = tokenize_example(parse_record(RECORDS[DatasetFormat.S1K]), tok, TemplateFamily.R1)
    masked, trained = split(tok, example)
    assert masked[-2:] == ["<think>", "\n"]
    assert trained == R1_COMPLETION[2:]


def test_end_of_turn_is_trained_and_pad_differs(tokenizer: Any) -> None:
    example = tokenize_example(
        parse_record(RECORDS[DatasetFormat.S1K]), tokenizer, TemplateFamily.S1
    )
    assert example.labels[-1] == tokenizer.eos_token_id != tokenizer.pad_token_id


def test_ensure_pad_token_replaces_a_pad_equal_to_eos(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def _examples(n: int = 6) -> list[Any]:
    return [parse_record(r) for r in generate(n, seed=5, min_terms=3, max_terms=3)]


def test_overlong_examples_are_dropped_or_truncated_and_counted(tokenizer: Any) -> None:
    full, stats = encode_examples(
        _examples(), tokenizer, template=TemplateFamily.S1, block_size=1024
    )
    assert (stats.records, stats.kept, stats.overlong) == (6, 6, 0)
    block = min(len(e.input_ids) for e in full) - 1
    _, dropped = encode_examples(
        _examples(), tokenizer, template=TemplateFamily.S1, block_size=block, overlong="drop"
    )
    assert (dropped.overlong, dropped.dropped, dropped.kept) == (6, 6, 0)
    cut, truncated = encode_examples(
        _examples(), tokenizer, template=TemplateFamily.S1, block_size=block, overlong="truncate"
    )
    assert (truncated.overlong, truncated.truncated, truncated.kept) == (6, 6, 6)
    assert all(len(e.input_ids) == len(e.labels) == block for e in cut)
    assert truncated.max_length == max(len(e.input_ids) for e in full)
    # A prompt that alone fills the block leaves nothing to train: dropped even in truncate.
    _, tiny = encode_examples(
        _examples(), tokenizer, template=TemplateFamily.S1, block_size=8, overlong="truncate"
    )
    assert (tiny.dropped, tiny.kept) == (6, 0)


def test_packing_keeps_examples_whole_and_apart(tokenizer: Any, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    examples, _ = encode_examples(
        _examples(5), tokenizer, template=TemplateFamily.S1, block_size=128
    )
    packed = pack(examples, block_size=128)
    assert len(packed) < len(examples)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert all(len(p.input_ids) <= 128 for p in packed)
    first = packed[0]
    n0 = len(examples[0].input_ids)
    assert first.position_ids[n0] == 0 and first.labels[:n0] == examples[0].labels
    # The second example's logits inside the pack equal its logits alone.
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    batch = collate([first], tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    alone = collate([examples[1]], tokenizer.pad_token_id)
    n1 = len(examples[1].input_ids)
    with torch.no_grad():
        in_pack = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        single = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
    torch.testing.assert_close(in_pack[0, n0 : n0 + n1], single[0], atol=1e-5, rtol=1e-4)


def test_collate_right_pads(tokenizer: Any) -> None:
    examples, _ = encode_examples(
        [parse_record(r) for r in generate(2, seed=0, min_terms=2, max_terms=5)],
        tokenizer,
        template=TemplateFamily.S1,
        block_size=128,
    )
    batch = collate(examples, tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    short = min(range(2), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][short].sum() == n


def test_load_examples_and_sha(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "sums.jsonl", n=10, seed=0)
    examples, stats = load_examples(path, tokenizer, block_size=128, packing=True)
    assert stats.records == stats.kept == 10 and stats.sequences == len(examples) < 10
    assert len(dataset_sha256(path)) == 64


def test_parquet_and_save_to_disk_train_on_the_same_tokens_as_jsonl(
    tmp_path: Path, tokenizer: Any
) -> None:
    import json

    from tests.platform.data import parquet, save_to_disk

    path = write_jsonl(tmp_path / "sums.jsonl", n=6, seed=0)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    (tmp_path / "sums.parquet").write_bytes(parquet(*rows))
    folder = save_to_disk(tmp_path / "sums-hf", *rows)
    want, _ = load_examples(path, tokenizer, block_size=128)
    for other in (tmp_path / "sums.parquet", folder):
        got, stats = load_examples(other, tokenizer, block_size=128)
        assert stats.records == 6 and [g.input_ids for g in got] == [w.input_ids for w in want]
        assert [g.labels for g in got] == [w.labels for w in want]
    assert dataset_sha256(folder) == dataset_sha256(folder) != dataset_sha256(path)
