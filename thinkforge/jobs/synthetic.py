"""A synthetic reasoning task in s1K format where thinking measurably helps.

Each question asks for the sum of a few single digits; the thinking trace writes the
running sums one line per step and the attempt is the total:

    {"question": "Sum: 3 5 2 7",
     "thinking_trajectories": ["3+5=8\\n8+2=10\\n10+7=17"],
     "attempt": "17"}

Each trace step is one fact from a small addition table, which a tiny model learns in
a few CPU minutes; producing the total of 3-5 digits in one shot is much harder. So a
model trained on the traces answers well with its full thinking budget and poorly
when budget forcing cuts thinking short: the effect the demo and issue 6 measure.

    train, test = train_test_split(n_train=2000, n_test=200, seed=0)
    train, test = train_test_split(8000, 200, recheck_rate=0.25)  # some traces "Wait"
    write_jsonl("train.jsonl", n=2000, seed=0)
    extract_answer("Answer: 17")  # -> "17"

Issue 17, a task where a forced "Wait" fixes mistakes (s1's sequential scaling): the
first pass writes the terms and their total in one line ("3+5+2+7=17"), a one-shot sum
the tiny model often gets wrong; a first recheck ("Wait") redoes the running sums one
term a step, which it gets right far more often; a second recheck confirms the total the
running sums gave, and each one after that confirms it again. Training traces carry 0-3
rechecks (``RECHECK_MIX``: unforced, the model stops after its first pass), ``slip_rate``
of the rechecked rows have a wrong first total that the recheck corrects (so the model
learns to compute the recheck, not copy the first pass), and ``plain_rate`` of the rows
are the running sums alone; the attempt is the true total:

    train, test = recheck_split(n_train=2000, n_test=200, seed=0)
    make_recheck_record([3, 5, 2, 7], rechecks=2)["thinking_trajectories"][0]
    # -> "3+5+2+7=17\\nWait\\n3+5=8\\n8+2=10\\n10+7=17\\nWait\\nSo the total is 17"

A second domain with another token distribution (words, no digits), for the MoE demo and
bench/moe_balance.py: reverse a list of words, one word per thinking line. Records carry
``"domain": "sums" | "words"`` (ignored by training, read by the benchmark):

    write_mixed_jsonl("mixed.jsonl", n=2000, seed=0)  # half sums, half words, shuffled
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "extract_answer",
    "generate",
    "generate_mixed",
    "make_recheck_record",
    "make_record",
    "recheck_split",
    "train_test_split",
    "write_jsonl",
    "write_mixed_jsonl",
    "write_records",
]

Record = dict[str, Any]


def make_record(terms: list[int], *, recheck: bool = False) -> Record:
    """The s1K row for one list of terms: running sums in the trace, the total as attempt.

    ``recheck`` appends "Wait" and the running sums again, as a model that double-checks
    would: trained on some such traces, a model forced to "Wait" re-derives the total
    instead of continuing with text it has never seen.
    """
    if len(terms) < 2:
        raise ValueError("a sum needs at least two terms")
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    trace = "\n".join(steps)
    return {
        "question": "Sum: " + " ".join(str(t) for t in terms),
        "thinking_trajectories": [f"{trace}\nWait\n{trace}" if recheck else trace],
        "attempt": str(total),
    }


def _draw_terms(rng: random.Random, min_terms: int, max_terms: int, max_digit: int) -> list[int]:
    return [rng.randint(0, max_digit) for _ in range(rng.randint(min_terms, max_terms))]


def _rechecks(seed: int, rate: float) -> Callable[[], bool]:
    """Which records get a recheck; its own RNG, so the questions do not depend on rate."""
    if not 0 <= rate <= 1:
        raise ValueError("recheck_rate must be in [0, 1]")
    rng = random.Random(f"recheck-{seed}")
    return lambda: rate > 0 and rng.random() < rate


def generate(
    n: int,
    seed: int = 0,
    *,
    min_terms: int = 3,
    max_terms: int = 5,
    max_digit: int = 9,
    recheck_rate: float = 0.0,
) -> list[Record]:
    """``n`` records drawn with their own seeded RNG (questions may repeat);
    ``recheck_rate`` of them double-check their sums after a "Wait" (see make_record)."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError("need 2 <= min_terms <= max_terms")
    rng, recheck = random.Random(seed), _rechecks(seed, recheck_rate)
    return [
        make_record(_draw_terms(rng, min_terms, max_terms, max_digit), recheck=recheck())
        for _ in range(n)
    ]


def train_test_split(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    min_terms: int = 3,
    max_terms: int = 5,
    max_digit: int = 9,
    recheck_rate: float = 0.0,
) -> tuple[list[Record], list[Record]]:
    """A training set and a held-out set with no question in common.

    The held-out questions are drawn first and distinct, then training questions are
    drawn until ``n_train`` of them avoid the held-out set. ``recheck_rate`` applies to
    the training records only.
    """
    rng, recheck = random.Random(seed), _rechecks(seed, recheck_rate)
    return _disjoint_split(
        n_train,
        n_test,
        draw=lambda: _draw_terms(rng, min_terms, max_terms, max_digit),
        held_out=make_record,
        trained=lambda terms: make_record(terms, recheck=recheck()),
    )


def _disjoint_split(
    n_train: int,
    n_test: int,
    *,
    draw: Callable[[], list[int]],
    held_out: Callable[[list[int]], Record],
    trained: Callable[[list[int]], Record],
) -> tuple[list[Record], list[Record]]:
    """Distinct held-out questions drawn first, then training rows whose questions avoid
    them; ``draw`` gives the terms, the other two make each side's record."""
    test: dict[str, Record] = {}
    while len(test) < n_test:
        rec = held_out(draw())
        test.setdefault(rec["question"], rec)
    train: list[Record] = []
    while len(train) < n_train:
        terms = draw()
        if make_record(terms)["question"] not in test:
            train.append(trained(terms))
    return train, list(test.values())


def make_recheck_record(terms: list[int], *, rechecks: int = 0, slip: int = 0) -> Record:
    """Issue 17's row: a first pass that writes the terms and their total in one line (off
    by ``slip`` when it is not 0); a first recheck, "Wait" and the running sums one term a
    step (the plain task's trace), whose last line gives the total; then each further
    recheck "Wait" and a confirmation of that total (``So the total is 17``)."""
    if len(terms) < 2:
        raise ValueError("a sum needs at least two terms")
    if slip and not rechecks:
        raise ValueError("a slipped first pass needs a recheck to correct it")
    plain, total = make_record(terms), sum(terms)
    guess = total + slip if total + slip >= 0 else total - slip  # never a negative sum
    passes = ["+".join(str(t) for t in terms) + f"={guess}"]
    if rechecks:
        running_sums = plain["thinking_trajectories"][0]
        passes += [running_sums, *[f"So the total is {total}"] * (rechecks - 1)]
    return {**plain, "thinking_trajectories": ["\nWait\n".join(passes)]}


# Rechecks per training row: mostly none, so that unforced the model ends thinking after
# its first pass; after each recheck, too, ending is more frequent than going on, so that
# forced waits, not the model, decide how many there are. Rows with two and three
# rechecks put a second wait and more (a confirmation after the running sums, and again
# after a confirmation) in distribution: with none past two, a model that rechecked once
# by itself was pushed by two forced waits into a pass it had never seen. A rechecked
# first pass slips (a wrong total) at ``slip_rate``, so the model learns to compute the
# recheck, not to copy the first pass's total.
RECHECK_MIX = (0.6, 0.28, 0.08, 0.04)
SLIPS = (-10, -2, -1, 1, 2, 10)


def recheck_split(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    min_terms: int = 3,
    max_terms: int = 6,
    max_digit: int = 9,
    slip_rate: float = 0.4,
    plain_rate: float = 0.3,
) -> tuple[list[Record], list[Record]]:
    """Training rows in issue 17's format and held-out questions, disjoint.

    Held-out questions are drawn exactly as training ones (the same RNG and ranges) and
    never trained on; their traces are the plain first pass (only the attempt is graded).
    ``slip_rate``: the share of rechecked rows whose first pass is wrong. ``plain_rate``:
    the share of rows that are the plain task's trace alone (no one-shot first pass),
    which teaches the recheck's running sums in a short context.
    """
    if not 0 <= slip_rate <= 1 or not 0 <= plain_rate < 1:
        raise ValueError("slip_rate must be in [0, 1] and plain_rate in [0, 1)")
    rng = random.Random(f"recheck-task-{seed}")

    def trained(terms: list[int]) -> Record:
        if rng.random() < plain_rate:
            return make_record(terms)
        rechecks = rng.choices(range(len(RECHECK_MIX)), weights=RECHECK_MIX)[0]
        slip = rng.choice(SLIPS) if rechecks and rng.random() < slip_rate else 0
        return make_recheck_record(terms, rechecks=rechecks, slip=slip)

    return _disjoint_split(
        n_train,
        n_test,
        draw=lambda: _draw_terms(rng, min_terms, max_terms, max_digit),
        held_out=make_recheck_record,
        trained=trained,
    )


def write_jsonl(path: str | Path, n: int, seed: int = 0, **kwargs: Any) -> Path:
    """Write ``generate(n, seed, **kwargs)`` as JSONL; returns the path."""
    return write_records(path, generate(n, seed, **kwargs))


def write_records(path: str | Path, records: list[Record]) -> Path:
    """Write records as JSONL (e.g. the two halves of ``train_test_split``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


_LAST_INT = re.compile(r"(-?\d+)(?!.*\d)", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The last integer in a completion's answer text, or None when there is none."""
    match = _LAST_INT.search(text)
    return match.group(1) if match else None


# Whole tokens of the tiny tokenizer's corpus (thinkforge.jobs.tiny), no digits.
_WORDS = [
    "system",
    "user",
    "assistant",
    "think",
    "answer",
    "Sum",
    "Wait",
    "Final",
    "You",
    "are",
    "helpful",
    "The",
    "is",
    "Let",
    "me",
    "step",
    "by",
    "So",
    "the",
    "total",
    "Question",
    "Solve",
    "this",
    "problem",
    "and",
    "put",
    "final",
    "last",
    "Hmm",
    "check",
    "again",
]


def make_word_record(words: list[str]) -> Record:
    """Reverse a list of words; the trace names one word per line, last first."""
    backwards = list(reversed(words))
    return {
        "question": "Reverse: " + " ".join(words),
        "thinking_trajectories": ["\n".join(backwards)],
        "attempt": " ".join(backwards),
        "domain": "words",
    }


def generate_mixed(n: int, seed: int = 0, words_share: float = 0.5) -> list[Record]:
    """``n`` records, about ``words_share`` of them word reversals and the rest sums."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        if rng.random() < words_share:
            records.append(make_word_record(rng.sample(_WORDS, rng.randint(3, 5))))
        else:
            record = make_record(_draw_terms(rng, 3, 5, 9))
            records.append({**record, "domain": "sums"})
    return records


def write_mixed_jsonl(path: str | Path, n: int, seed: int = 0, **kwargs: Any) -> Path:
    return write_records(path, generate_mixed(n, seed, **kwargs))
