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
    """A folder in the layout ``datasets.Dataset.save_to_disk`` writes (the ``datasets``
    package is not installed here): Arrow IPC streams listed in ``state.json``, beside
    ``dataset_info.json``; with ``split``, a ``DatasetDict`` holding that one split."""
    import pyarrow as pa

    root = folder
    if split is not None:
        folder.mkdir(parents=True)
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": [split]}))
        folder = folder / split
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(list(rows))
    half = max(1, len(rows) // 2)
    names = []
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        if part.num_rows == 0:
            continue
        name = f"data-{i:05d}-of-00002.arrow"
        with (
            pa.OSFile(str(folder / name), "wb") as sink,
            pa.ipc.new_stream(sink, part.schema) as writer,
        ):
            writer.write_table(part, max_chunksize=1)
        names.append({"filename": name})
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    state = {"_data_files": names, "_fingerprint": "0", "_split": split}
    (folder / "state.json").write_text(json.dumps(state))
    return root
