"""Small valid and invalid dataset lines for upload tests."""

from __future__ import annotations

import json

S1K = {"question": "Sum: 1 2", "thinking_trajectories": ["1+2=3"], "attempt": "Answer: 3"}
LIMO = {"question": "Sum: 2 2", "solution": "2+2=4", "answer": "4"}
CHAT = {
    "messages": [
        {"role": "user", "content": "Sum: 1 1"},
        {"role": "assistant", "content": "2", "reasoning_content": "1+1=2"},
    ]
}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# Rows in the published schemas, as their parquet files and Hugging Face datasets hold them.
S1K_ROW = {
    "solution": "3",
    "question": "Sum: 1 2",
    "cot_type": "math",
    "source_type": "local",
    "metadata": "{}",
    "cot": None,
    "thinking_trajectories": ["1+2=3", "so 3"],
    "attempt": "Answer: 3",
}
S1K11_ROW = {
    "solution": "4",
    "question": "Sum: 2 2",
    "cot_type": "math",
    "source_type": "local",
    "metadata": "{}",
    "gemini_thinking_trajectory": "2+2 is 4",
    "gemini_attempt": "4",
    "deepseek_thinking_trajectory": "2+2=4",
    "deepseek_attempt": "Answer: 4",
}
LIMO_ROW = {"question": "Sum: 2 3", "solution": "2+3=5", "answer": "5"}


def parquet(*rows: dict) -> bytes:
    """A parquet file of ``rows`` (the schema taken from them, as pandas/datasets write it)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), sink, row_group_size=2)
    return sink.getvalue()


def save_to_disk(folder, *rows: dict, split: str | None = None):  # type: ignore[no-untyped-def]
    """A folder written by the real ``datasets.Dataset.save_to_disk`` (in two shards, as a
    published dataset of any size is); with ``split``, a ``DatasetDict`` holding that one
    split."""
    import datasets

    table = datasets.Dataset.from_list(list(rows))
    shards = min(2, len(rows))
    if split is not None:
        datasets.DatasetDict({split: table}).save_to_disk(str(folder), num_shards={split: shards})
    else:
        table.save_to_disk(str(folder), num_shards=shards)
    return folder
