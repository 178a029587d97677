"""The distillation loop on CPU: does curation pick better training data than no curation?

1. Teacher: ``thinkforge/tiny`` trained on the running-sum task with the tiny-cpu recipe
   (its default 2 epochs over 2000 problems: a teacher that is right often, not always).
2. A fresh pool of questions (none held out, none the teacher trained on) is answered by
   the teacher, ``--samples`` sampled traces per question (temperature ``--temperature``,
   full thinking budget), in process through the Serve engine (``TransformersEngine``).
3. Verification and curation are the product's (``thinkforge.jobs.distill.curate``):
   quality, right answers only (``min_correct=1``), longest thinking first, cut at ``--keep``.
   The uncurated baseline is ``--keep`` traces drawn at random (seeded) from all traces,
   one per question, right or wrong.
4. Two fresh tiny students, one per file, trained with the same recipe and steps, answer
   the same held-out questions greedily at the full budget; their accuracies are compared.

    .venv/bin/python bench/distill_loop.py                    # ~10 min on 2 quiet cores
    .venv/bin/python bench/distill_loop.py --keep 400 --pool 800
    .venv/bin/python bench/distill_loop.py --teacher DIR --student-epochs 40   # reuse a teacher
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-cpu.yaml"))
    p.add_argument("--n-teacher", type=int, default=2000, help="teacher training problems")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher", help="a trained teacher model directory: skip training one")
    p.add_argument("--pool", type=int, default=600, help="fresh questions to distil")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--keep", type=int, default=300, help="training examples per student")
    p.add_argument("--student-epochs", type=int, default=8)
    p.add_argument(
        "--diversity-by-terms", action="store_true",
        help="give each question its number of terms as its category, so the diversity "
        "stage spreads the kept traces across sum lengths (s1 samples across domains)",
    )  # fmt: skip
    p.add_argument(
        "--no-length-rank",
        action="store_true",
        help="curation keeps right answers in a seeded order instead of longest thinking first",
    )
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="default: a temp dir")
    p.add_argument("--output", help="write results.json here")
    return p.parse_args(argv)


def train(recipe: str, dataset: Path, work: Path, name: str, epochs: int) -> Path:
    """The recipe through the job's own training path on a local 2-CPU Ray cluster."""
    import ray
    from scaling import _copy_model

    from thinkforge.jobs.config import SFTConfig
    from thinkforge.jobs.sft import run_training
    from thinkforge.jobs.tiny import resolve_base_model

    cfg = SFTConfig.from_yaml(
        recipe, overrides=[f"dataset={dataset}", f"hyperparameters.n_epochs={epochs}"]
    )
    model_path = resolve_base_model(cfg.model, work / "data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    try:
        result = run_training(cfg, name, str(work / "ray"), model_path=model_path)
    finally:
        ray.shutdown()
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    final = work / name
    with result.checkpoint.as_directory() as ckpt:
        _copy_model(Path(ckpt), final)
    return final


def answer(engine: Any, questions: list[str], temperature: float, seed: int) -> list[Any]:
    """One completion per question at the full thinking budget, in one batched call."""
    from scaling import prompt_ids

    from thinkforge.serve.config import ThinkingParams
    from thinkforge.serve.engine import GenerationRequest, GenerationResult, SamplingParams

    requests = [
        GenerationRequest(
            str(i), prompt_ids(engine, q),
            SamplingParams(temperature=temperature, seed=seed + i, max_completion_tokens=200),
            ThinkingParams(),
        )
        for i, q in enumerate(questions)
    ]  # fmt: skip
    done = {e.request_id: e for e in engine.generate(requests) if isinstance(e, GenerationResult)}
    return [done.get(str(i)) for i in range(len(questions))]


def distil(engine: Any, pool: list[Any], samples: int, temperature: float, seed: int) -> list[Any]:
    """Traces in the job's shape, verified as the job verifies them."""
    from thinkforge.jobs.answers import extract_answer, is_correct
    from thinkforge.jobs.distill import Trace

    traces = []
    for s in range(samples):
        for q, g in zip(pool, answer(engine, [q.question for q in pool], temperature,
                                     seed + 100_003 * s), strict=True):  # fmt: skip
            if g is None:
                traces.append(Trace(index=q.index, sample=s, error="generation failed"))
                continue
            traces.append(Trace(
                index=q.index, sample=s, thinking=g.reasoning_text, attempt=g.content_text,
                prediction=extract_answer(g.content_text) or "",
                correct=is_correct(g.content_text, q.reference),
                thinking_tokens=g.thinking.tokens, completion_tokens=g.usage.completion_tokens,
                forced_end=g.thinking.forced_end, finish_reason=g.finish_reason.value,
            ))  # fmt: skip
    return traces


def _terms(question: str) -> str:
    """The number of terms of a running-sum question ("Sum: 3 5 2" -> "3")."""
    return str(len(question.split()) - 1)


def s1k_row(q: Any, t: Any) -> dict[str, Any]:
    return {"question": q.question, "thinking_trajectories": [t.thinking or " "],
            "attempt": t.attempt or " "}  # fmt: skip


def accuracy(model: Path, test: list[dict[str, Any]]) -> float:
    from scaling import load_engine

    from thinkforge.jobs.answers import is_correct

    engine = load_engine(model)
    results = answer(engine, [r["question"] for r in test], 0.0, 0)
    right = sum(g is not None and is_correct(g.content_text, r["attempt"])
                for g, r in zip(results, test, strict=True))  # fmt: skip
    return right / len(test)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from thinkforge.jobs.config import Curation
    from thinkforge.jobs.distill import PoolQuestion, curate
    from thinkforge.jobs.synthetic import generate, train_test_split, write_records

    torch.set_num_threads(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="thinkforge-distill-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_rows, test = train_test_split(args.n_teacher, args.n_test, seed=args.seed)
    held_out = {r["question"] for r in test} | {r["question"] for r in teacher_rows}
    fresh = [
        r for r in generate(args.pool * 4, seed=args.seed + 1) if r["question"] not in held_out
    ]
    seen: set[str] = set()
    fresh = [r for r in fresh if not (r["question"] in seen or seen.add(r["question"]))]  # type: ignore[func-returns-value]
    pool = [PoolQuestion(index=i, question=r["question"], reference=r["attempt"],
                         category=_terms(r["question"]) if args.diversity_by_terms else "")
            for i, r in enumerate(fresh[: args.pool])]  # fmt: skip

    teacher = Path(args.teacher) if args.teacher else train(
        args.recipe, write_records(work / "teacher.jsonl", teacher_rows), work, "teacher",
        args.teacher_epochs,
    )  # fmt: skip
    from scaling import load_engine

    traces = distil(load_engine(teacher), pool, args.samples, args.temperature, args.seed)
    teacher_acc = sum(t.correct for t in traces) / len(traces)
    print(f"teacher: {len(traces)} traces, {100 * teacher_acc:.1f}% right", flush=True)

    curated, stages, _ = curate(
        pool,
        traces,
        Curation(
            min_correct=1,
            max_examples=args.keep,
            category_field="terms" if args.diversity_by_terms else None,
            rank_by_length=not args.no_length_rank,
        ),
        seed=args.seed,
    )
    by_q = {q.index: q for q in pool}
    rng = random.Random(args.seed)
    one_each = {}
    for t in rng.sample(traces, len(traces)):
        one_each.setdefault(t.index, t)
    baseline = list(one_each.values())[: len(curated)]
    baseline_right = sum(t.correct for t in baseline) / max(len(baseline), 1)
    write_records(work / "curated.jsonl", [{k: v for k, v in r.items() if k != "metadata"}
                                           for r in curated])  # fmt: skip
    write_records(work / "uncurated.jsonl", [s1k_row(by_q[t.index], t) for t in baseline])
    print(f"curated: {len(curated)} rows (all right); uncurated: {len(baseline)} rows, "
          f"{100 * baseline_right:.1f}% right", flush=True)  # fmt: skip

    students = {}
    for name in ("curated", "uncurated"):
        model = train(args.recipe, work / f"{name}.jsonl", work, f"student-{name}",
                      args.student_epochs)  # fmt: skip
        students[name] = accuracy(model, test)
        print(f"student on {name}: {100 * students[name]:.1f}% of {len(test)} held-out",
              flush=True)  # fmt: skip
    results = {
        "teacher_trace_accuracy": teacher_acc, "stages": stages, "kept": len(curated),
        "uncurated_trace_accuracy": baseline_right,
        "student_accuracy": students, "held_out": len(test),
        "ratio_curated_over_uncurated": students["curated"] / max(students["uncurated"], 1e-9),
        "args": vars(args), "wall_s": round(time.perf_counter() - started),
    }  # fmt: skip
    print(json.dumps(results, indent=1, default=str))
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
