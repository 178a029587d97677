"""Training examples: records -> chat text -> token ids with assistant-only labels.

Every accepted format (chat, s1K, LIMO) is first normalised by ``config.parse_record``
into prompt turns, a thinking trace and an answer. Here that becomes the model's text:

    <prompt turns, via the tokenizer's chat template, ending "<|im_start|>assistant\\n">
    <start delimiter><thinking>\\n<end delimiter><answer><end of turn>

with s1's conventions: the trace is stripped, and in the s1 family the answer gets an
"Answer: " prefix unless it already has one. Labels are -100 on the prompt, so the loss
covers thinking + answer + the end-of-turn token (trained, so the model learns to stop);
padding uses a pad token distinct from end of turn so the stop token is never masked.

    tokenizer = AutoTokenizer.from_pretrained(path); ensure_pad_token(tokenizer)
    examples, stats = load_examples(cfg.dataset, tokenizer, template=cfg.template,
                                    block_size=cfg.block_size, overlong=cfg.overlong)
    batch = collate(examples[:4], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from thinkforge.jobs.config import (
    DatasetFormat,
    ReasoningExample,
    TemplateFamily,
    iter_records,
)
from thinkforge.jobs.config import dataset_sha256 as _dataset_sha256

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "TokenizedExample",
    "collate",
    "dataset_sha256",
    "encode_examples",
    "ensure_pad_token",
    "load_examples",
    "pack",
    "render",
    "tokenize_example",
]

IGNORE_INDEX = -100
# Tokens that never occur in training text, so padding with one masks nothing real.
_FALLBACK_PADS = ("<|endoftext|>", "<|fim_pad|>", "<|vision_pad|>")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    # Restart at 0 for each example inside a packed sequence.
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))


@dataclass
class DataStats:
    """What happened to the dataset on its way to the model (logged by the job)."""

    records: int = 0
    kept: int = 0
    overlong: int = 0
    truncated: int = 0
    dropped: int = 0
    max_length: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    sequences: int = 0  # after packing

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token that is not end of turn (s1: pad != eos).

    R1-distill tokenizers pad with their end of sentence and have no ``<|endoftext|>``;
    like s1 on Qwen, a reserved token of the vocabulary (``<|fim_pad|>``) pads instead."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _FALLBACK_PADS:
        if candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    raise ValueError(
        f"the tokenizer's pad token must differ from its end-of-turn token "
        f"{tokenizer.eos_token!r}, and it has none of {', '.join(_FALLBACK_PADS)} to use instead"
    )


def render(example: ReasoningExample, tokenizer: Any, template: TemplateFamily) -> tuple[str, str]:
    """(prompt text, completion text) for one example; the completion is what is trained."""
    start, end = template.delimiters
    messages = [{"role": m.role, "content": m.content} for m in example.prompt]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Templates such as R1-distill's open thinking themselves: do not open it twice.
    opened = prompt.endswith(start) or prompt.endswith(start.rstrip("\n"))
    answer = example.answer.strip()
    if template is TemplateFamily.S1 and "Answer:" not in answer:
        answer = "Answer: " + answer
    thinking = example.thinking.strip()
    body = f"{thinking}\n{end}" if thinking else end
    if not opened:
        body = start + body
    elif not prompt.endswith(start):
        body = "\n" + body
    return prompt, body + answer + tokenizer.eos_token


def tokenize_example(
    example: ReasoningExample, tokenizer: Any, template: TemplateFamily
) -> TokenizedExample:
    """Token ids and labels; prompt and completion are tokenized apart so the boundary
    between them is exact (the prompt ends in a newline, so no merge crosses it)."""
    prompt, completion = render(example, tokenizer, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return TokenizedExample(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    )


def encode_examples(
    examples: Iterable[ReasoningExample],
    tokenizer: Any,
    *,
    template: TemplateFamily,
    block_size: int,
    overlong: Literal["truncate", "drop"] = "drop",
) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize, then truncate or drop examples longer than ``block_size``, counting them."""
    stats, out = DataStats(), []
    for example in examples:
        stats.records += 1
        tok = tokenize_example(example, tokenizer, template)
        stats.max_length = max(stats.max_length, len(tok.input_ids))
        if len(tok.input_ids) > block_size:
            stats.overlong += 1
            trained_left = any(x != IGNORE_INDEX for x in tok.labels[:block_size])
            if overlong == "drop" or not trained_left:
                stats.dropped += 1
                continue
            stats.truncated += 1
            tok = TokenizedExample(tok.input_ids[:block_size], tok.labels[:block_size])
        stats.kept += 1
        stats.total_tokens += len(tok.input_ids)
        stats.trained_tokens += sum(1 for x in tok.labels if x != IGNORE_INDEX)
        out.append(tok)
    stats.sequences = len(out)
    return out, stats


def pack(examples: Sequence[TokenizedExample], block_size: int) -> list[TokenizedExample]:
    """Greedily concatenate whole examples, in order, into sequences of <= block_size.

    Position ids restart per example; collated with ``packed=True`` (no attention mask),
    transformers turns them into a block-diagonal mask so packed examples stay apart.
    """
    packed: list[TokenizedExample] = []
    current = TokenizedExample([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > block_size:
            packed.append(current)
            current = TokenizedExample([], [], [])
        current.input_ids.extend(ex.input_ids)
        current.labels.extend(ex.labels)
        current.position_ids.extend(ex.position_ids)
    if current.input_ids:
        packed.append(current)
    return packed


def load_examples(
    path: str | Path,
    tokenizer: Any,
    *,
    fmt: DatasetFormat = DatasetFormat.AUTO,
    template: TemplateFamily = TemplateFamily.S1,
    block_size: int = 32768,
    overlong: Literal["truncate", "drop"] = "drop",
    packing: bool = False,
) -> tuple[list[TokenizedExample], DataStats]:
    """Read a dataset (JSONL, parquet or a save_to_disk folder) and return the training
    sequences and their stats."""
    records = (example for _, example in iter_records(path, fmt))
    examples, stats = encode_examples(
        records, tokenizer, template=template, block_size=block_size, overlong=overlong
    )
    if packing:
        examples = pack(examples, block_size)
        stats.sequences = len(examples)
    return examples, stats


def collate(batch: Sequence[TokenizedExample], pad_id: int, packed: bool = False) -> dict[str, Any]:
    """Right-pad a batch into tensors: input_ids, labels, position_ids, attention_mask.

    Packed batches carry no attention mask: transformers then derives the per-example
    causal mask from the restarting position ids (padding restarts at 0 too).
    """
    import torch

    width = max(len(ex.input_ids) for ex in batch)

    def padded(rows: list[list[int]], value: int) -> Any:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    out = {
        "input_ids": padded([ex.input_ids for ex in batch], pad_id),
        "labels": padded([ex.labels for ex in batch], IGNORE_INDEX),
        "position_ids": padded([ex.position_ids for ex in batch], 0),
    }
    if not packed:
        out["attention_mask"] = padded([[1] * len(ex.input_ids) for ex in batch], 0)
    return out


def dataset_sha256(path: str | Path) -> str:
    """The dataset's sha256 (``config.dataset_sha256``): the lineage tag on runs and model
    versions."""
    return _dataset_sha256(path)
