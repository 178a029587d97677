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
