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
first pass writes the terms and their total in one line ("3+5+2+7+4+9=30"), a one-shot
sum the tiny model often gets wrong. Each recheck ("Wait") redoes the last one-shot line
more carefully: the running sums one term a step for the first half of its additions,
the rest in a shorter one-shot line ("3+5=8 / 8+2=10 / 10+7=17 / 17+4+9=30"); the next
recheck does the same to that shorter line ("17+4=21 / 21+9=30"), and once only single
steps are left a recheck confirms the total. So one wait finishes sums of up to four
terms and two waits finish all of them (3-6 terms), each reading its terms from the line
just above. Training traces carry 0-3 rechecks (``RECHECK_MIX``: unforced, the model
often stops after its first pass), ``slip_rate`` of the rechecked rows have a wrong first
total, and of the rows with a further recheck a wrong one-shot remainder, that the next
recheck corrects (so the model learns to compute each recheck, not copy the line above);
``plain_rate`` of the rows are the running sums alone. The attempt is the true total:

    train, test = recheck_split(n_train=2000, n_test=200, seed=0)
    make_recheck_record([3, 5, 2, 7, 4], rechecks=2)["thinking_trajectories"][0]
    # -> "3+5+2+7+4=21\\nWait\\n3+5=8\\n8+2=10\\n10+7+4=21\\nWait\\n10+7=17\\n17+4=21"

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


def _with_slip(total: int, slip: int) -> int:
    """``total`` off by ``slip``, never negative: the slip flips sign instead."""
    return total + slip if total + slip >= 0 else total - slip


def _one_shot(terms: list[int], slip: int = 0) -> str:
    """The terms and their total in one line, ``3+5+2+7=17`` (off by ``slip``)."""
    return "+".join(str(t) for t in terms) + f"={_with_slip(sum(terms), slip)}"


def _expanded(additions: int) -> int:
    """How many of a one-shot line's additions a recheck redoes one term a step: the first
    half (rounded up), or all of them when at most one would be left."""
    half = (additions + 1) // 2
    return additions if half >= additions - 1 else half


def _recheck(terms: list[int], slip: int = 0) -> tuple[str, list[int]]:
    """One recheck of the one-shot line over ``terms``: the running sums one term a step
    for the first ``_expanded`` additions, then the rest as a shorter one-shot line whose
    first term is the running sum (its total off by ``slip``); once the sum is done
    (``terms == [total]``), a confirmation of the total. Returns the recheck's text and
    the terms it left to sum at once (``[total]`` once the sum is done)."""
    if len(terms) == 1:
        steps, rest = [f"So the total is {terms[0]}"], terms
    else:
        n = _expanded(len(terms) - 1)
        steps, running = [], terms[0]
        for term in terms[1 : n + 1]:
            steps.append(f"{running}+{term}={running + term}")
            running += term
        rest = [running, *terms[n + 1 :]]
    if len(rest) > 1:
        steps.append(_one_shot(rest, slip))
    elif slip:
        raise ValueError("a slip needs a one-shot line to put off: this recheck leaves none")
    return "\n".join(steps), rest


def make_recheck_record(
    terms: list[int], *, rechecks: int = 0, slips: tuple[int, ...] = ()
) -> Record:
    """Issue 17's row: a first pass that writes the terms and their total in one line
    (``3+5+2+7+4+9=30``); then each recheck, "Wait" and the last one-shot line redone:
    the running sums one term a step for the first half of its additions, the rest in a
    shorter one-shot line (``3+5=8 / 8+2=10 / 10+7=17 / 17+4+9=30``). Each recheck
    halves what is summed at once, so each wait makes the sum more careful, until only
    single steps are left (one recheck for up to four terms, two for five and six); a
    recheck after that confirms the total (``So the total is 30``). ``slips[0]`` puts the
    first pass's total off, ``slips[k]`` the k-th recheck's one-shot line; a slip needs a
    later recheck to correct it."""
    if len(terms) < 2:
        raise ValueError("a sum needs at least two terms")
    if any(slips[rechecks:]):
        raise ValueError("a slipped pass needs a later recheck to correct it")
    slips = (*slips, *(0,) * (rechecks + 1 - len(slips)))
    passes, at_once = [_one_shot(terms, slips[0])], list(terms)
    for slip in slips[1:]:
        text, at_once = _recheck(at_once, slip)
        passes.append(text)
    return {**make_record(terms), "thinking_trajectories": ["\nWait\n".join(passes)]}


def _slippable(terms: list[int], rechecks: int) -> list[bool]:
    """Which passes of ``make_recheck_record(terms, rechecks=...)`` end in a one-shot
    line that a slip can put off: the first, and each recheck that leaves a remainder."""
    out, at_once = [True], terms
    for _ in range(rechecks):
        _, at_once = _recheck(at_once)
        out.append(len(at_once) > 1)
    return out


# Rechecks per training row: half none, so that unforced the model often ends thinking
# after its first pass; after each recheck, ending is at least as frequent as going on,
# so that forced waits, not the model, decide how many there are. Rows with two and
# three rechecks put a second wait and more in distribution: the second finishes what
# the first left one-shot (five and six terms), or confirms the total. A first pass slips
# (a wrong total) in ``slip_rate`` of the rechecked rows, and so does a recheck's one-shot
# remainder when another recheck follows, so the model learns to compute each recheck,
# not to copy the line above.
RECHECK_MIX = (0.5, 0.25, 0.17, 0.08)
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
    ``slip_rate``: the share of rechecked rows whose first pass is wrong, and of rows with
    a further recheck whose one-shot remainder is wrong. ``plain_rate``:
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
        slips = [rng.choice(SLIPS) if rechecks and rng.random() < slip_rate else 0]
        slips += [rng.choice(SLIPS) if rng.random() < slip_rate else 0 for _ in range(rechecks - 1)]
        return make_recheck_record(
            terms,
            rechecks=rechecks,
            slips=tuple(s * ok for s, ok in zip(slips, _slippable(terms, rechecks), strict=False)),
        )

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
