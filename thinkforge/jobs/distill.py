"""Distillation: a teacher's thinking traces for a question pool, verified against the
reference answers and curated s1-style, written as an s1K-1.1 training file.

The control plane submits this module as a Ray Job (``POST /v1/datasets/distill``):

    python -m thinkforge.jobs.distill --distill-id distill-1 --config-json '{...}' --output out/

Generation runs on Ray Data: ``from_items`` over (question, sample) pairs, then
``map_batches`` with a pool of ``Teacher`` actors (``concurrency`` of them, so at most that
many requests are in flight) that ask an OpenAI-compatible endpoint (a deployment through
the Serve front door, or an external URL) or a registry version loaded in-process. Each
request is retried ``max_retries`` times with backoff; a request that still fails ends the
job: the traces done so far stay in ``traces.jsonl`` and an event says how many.

Then, pure Python (``curate``), each stage counted:

1. verification: each trace's final answer against the reference (``jobs.answers``, the
   checks evaluations use); per question, how many samples were right;
2. quality: malformed traces (empty thinking or answer), traces whose thinking never
   ended by itself (budget-forced end, or cut at ``max_completion_tokens``), duplicate
   questions (same normalised text: the first one stays);
3. correctness: questions with fewer than ``min_correct`` right samples go;
4. difficulty: questions a named weaker model answers right go (``weaker``), and the rest
   are ranked by thinking length, longest first (s1's proxy for difficulty);
5. diversity: round-robin over the values of a category field (s1 samples a domain, then a
   long trace within it), up to ``max_examples``.

Outputs in ``--output``: ``traces.jsonl`` (every trace), ``curated.jsonl`` (s1K-1.1 rows:
question, solution, thinking_trajectories, attempt), ``results.json`` (counts per stage,
per-question results, lineage) and ``events.jsonl`` (what the control plane shows as the
distillation's events; the same lines go to stdout as ``THINKFORGE_EVENT``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from thinkforge.contract import (
    DATASET_SHA_TAG,
    DISTILL_CURATED_FILE,
    DISTILL_EVENTS_FILE,
    DISTILL_TAG,
    DISTILL_TRACES_FILE,
    RESULTS_FILE,
    emit_error,
    event_line,
    sha256_file,
)
from thinkforge.jobs.answers import extract_answer, is_correct
from thinkforge.jobs.config import (
    Curation,
    DistillConfig,
    RecordError,
    TeacherTarget,
    iter_pool_rows,
    question_of,
)

__all__ = [
    "CURATED_FILE",
    "EVENTS_FILE",
    "TRACES_FILE",
    "Curation",
    "DistillConfig",
    "EventLog",
    "PoolQuestion",
    "TeacherFailed",
    "TeacherTarget",
    "Trace",
    "curate",
    "load_pool",
    "main",
    "run_distill",
]

TRACES_FILE = DISTILL_TRACES_FILE
CURATED_FILE = DISTILL_CURATED_FILE
EVENTS_FILE = DISTILL_EVENTS_FILE


# ---------------------------------------------------------------- the question pool


class PoolQuestion(BaseModel):
    index: int
    question: str
    reference: str
    category: str = ""


def load_pool(path: str | Path, category_field: str | None = None) -> list[PoolQuestion]:
    pool: list[PoolQuestion] = []
    for where, row in iter_pool_rows(path):
        try:
            question, reference = question_of(row)
        except RecordError as exc:
            raise ValueError(f"{path}, {where}: {exc}") from None
        category = str(row.get(category_field, "")) if category_field else ""
        pool.append(PoolQuestion(index=len(pool), question=question, reference=reference,
                                 category=category))  # fmt: skip
    if not pool:
        raise ValueError(f"{path} holds no questions")
    return pool


# ---------------------------------------------------------------- asking the teacher


class Trace(BaseModel):
    """One sample of one question. Strings are "" rather than None: rows travel through
    Ray Data's Arrow blocks, where an all-null column loses its type."""

    index: int
    sample: int
    thinking: str = ""
    attempt: str = ""
    prediction: str = ""
    correct: bool = False
    thinking_tokens: int = 0
    completion_tokens: int = 0
    forced_end: bool = False
    finish_reason: str = ""
    latency_s: float = 0.0
    tries: int = 0
    error: str = ""


class TeacherFailed(RuntimeError):
    def __init__(self, message: str, done: int, total: int) -> None:
        super().__init__(message)
        self.done, self.total = done, total


class Teacher:
    """A Ray Data actor: asks the teacher for a batch of (question, sample) rows, one
    request after another (the actor pool's size bounds the requests in flight)."""

    def __init__(self, target: dict[str, Any], sampling: dict[str, Any], *, timeout_s: float,
                 max_retries: int, backoff_s: float) -> None:  # fmt: skip
        self.target = TeacherTarget.model_validate(target)
        self.sampling = sampling
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self._ask = self._http(timeout_s) if self.target.base_url else self._local()

    def _http(self, timeout_s: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
        import httpx

        env = self.target.api_key_env
        key = os.environ.get(env, "") if env else os.environ.get("THINKFORGE_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert self.target.base_url is not None
        client = httpx.Client(base_url=self.target.base_url.rstrip("/") + "/",
                              headers=headers, timeout=timeout_s)  # fmt: skip

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            resp = client.post("chat/completions", json={"model": self.target.model, **body})
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
            return dict(resp.json())

        return ask

    def _local(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(self.target.model_uri)

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            (answer,) = model.predict([body])
            return dict(answer)

        return ask

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        rows = batch.to_dict("records")
        out = [self.ask(r["question"], r["reference"], int(r["index"]), int(r["sample"]))
               for r in rows]  # fmt: skip
        return pd.DataFrame([t.model_dump() for t in out])

    def ask(self, question: str, reference: str, index: int, sample: int) -> Trace:
        body = {
            "messages": [{"role": "user", "content": question}],
            **self.sampling,
            "seed": int(self.sampling.get("seed", 0)) + sample,  # distinct samples, repeatable
        }
        trace = Trace(index=index, sample=sample)
        started = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            trace.tries = attempt + 1
            try:
                answer = self._ask(body)
                break
            except Exception as exc:
                retryable = not isinstance(exc, RuntimeError) or isinstance(exc, _Retryable)
                trace.error = f"{type(exc).__name__}: {exc}"[:500]
                if not retryable or attempt == self.max_retries:
                    return trace
                time.sleep(self.backoff_s * 2**attempt)
        trace.error = ""
        trace.latency_s = time.perf_counter() - started
        try:
            _read_answer(answer, reference, trace)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            # An answer without the chat shape: a malformed trace, which curation drops.
            trace.thinking = trace.attempt = ""
        return trace


class _Retryable(RuntimeError):
    """A 5xx or 429: the teacher may answer if asked again."""


def _read_answer(body: dict[str, Any], reference: str, trace: Trace) -> None:
    choice = body["choices"][0]
    message = choice.get("message") or {}
    trace.attempt = message.get("content") or ""
    # vLLM names it reasoning; OpenAI-compatible reasoning models reasoning_content.
    trace.thinking = message.get("reasoning_content") or message.get("reasoning") or ""
    trace.finish_reason = choice.get("finish_reason") or ""
    trace.prediction = extract_answer(trace.attempt) or ""
    trace.correct = is_correct(trace.attempt, reference)
    usage = body.get("usage") or {}
    trace.completion_tokens = int(usage.get("completion_tokens") or 0)
    summary = body.get("thinking")
    if isinstance(summary, dict):
        trace.thinking_tokens = int(summary.get("tokens", 0))
        trace.forced_end = bool(summary.get("forced_end", False))
    else:
        details = usage.get("completion_tokens_details") or {}
        trace.thinking_tokens = int(details.get("reasoning_tokens") or 0)


def ray_generate(
    pool: Sequence[PoolQuestion], samples: int, target: TeacherTarget, config: DistillConfig,
    *, sampling: dict[str, Any],
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Trace rows as Ray Data finishes them (in no set order)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    items = [
        {"index": q.index, "sample": s, "question": q.question, "reference": q.reference}
        for q in pool
        for s in range(samples)
    ]
    local = target.model_uri is not None
    workers = 1 if local else config.concurrency  # one engine per process for a version
    batch = max(1, min(8, len(items) // (workers * 4)))  # small: progress streams back
    source = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
    ds = source.map_batches(
        Teacher,
        fn_constructor_kwargs={
            "target": target.model_dump(), "sampling": sampling,
            "timeout_s": config.request_timeout_s, "max_retries": config.max_retries,
            "backoff_s": config.retry_backoff_s,
        },
        batch_size=batch,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=workers),  # the bound on requests in flight
        # Asking over HTTP waits on the teacher, not the CPU: no CPU reserved, so the
        # actors never wait behind the teacher's own replicas on a small cluster.
        num_cpus=1 if local else 0,
    )  # fmt: skip
    for row in ds.iter_rows():  # Arrow rows hold numpy scalars: plain Python for pydantic
        yield {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}


Generate = Callable[..., Iterable[dict[str, Any]]]


# ---------------------------------------------------------------- events


class EventLog:
    """Events as ``THINKFORGE_EVENT`` lines on stdout and numbered lines in
    ``events.jsonl``, which the control plane copies into the distillation's events."""

    def __init__(self, path: Path, distill_id: str) -> None:
        self.path, self.distill_id, self.count = path, distill_id, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, type: str, message: str, level: str = "info", **data: Any) -> None:
        self.count += 1
        print(event_line(f"distill_{type}", distill_id=self.distill_id, **data), flush=True)
        record = {"n": self.count, "type": type, "level": level, "message": message, "data": data}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


Emit = Callable[..., None]


def collect(
    rows: Iterable[dict[str, Any]], total: int, emit: Emit, sink: Path, *, what: str = "traces"
) -> list[Trace]:
    """Traces as they come, appended to ``sink``; progress and throughput events at each
    tenth. A trace whose request failed past its retries raises TeacherFailed."""
    traces: list[Trace] = []
    started, tenth, tokens = time.perf_counter(), -1, 0
    with open(sink, "a", encoding="utf-8") as out:
        for row in rows:
            trace = Trace.model_validate(row)
            if trace.error:
                raise TeacherFailed(
                    f"the teacher failed after {trace.tries} tries: {trace.error}",
                    len(traces), total,
                )  # fmt: skip
            traces.append(trace)
            out.write(trace.model_dump_json() + "\n")
            out.flush()
            tokens += trace.completion_tokens
            if len(traces) * 10 // total != tenth or len(traces) == total:
                tenth = len(traces) * 10 // total
                elapsed = max(time.perf_counter() - started, 1e-9)
                emit(
                    "progress", f"{len(traces)} of {total} {what} generated",
                    done=len(traces), total=total, traces_per_s=round(len(traces) / elapsed, 3),
                    tokens_per_s=round(tokens / elapsed, 1),
                )  # fmt: skip
    return traces


# ---------------------------------------------------------------- curation


def _normalise(question: str) -> str:
    return re.sub(r"\s+", " ", question).strip().lower()


def curate(
    pool: Sequence[PoolQuestion],
    traces: Sequence[Trace],
    curation: Curation,
    *,
    seed: int,
    weaker_correct: dict[int, bool] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """(s1K-1.1 rows, counts per stage, per-question results). Pure: no I/O."""
    by_q: dict[int, list[Trace]] = {}
    for t in sorted(traces, key=lambda t: (t.index, t.sample)):
        by_q.setdefault(t.index, []).append(t)
    per_q = {
        q.index: {
            "index": q.index, "question": q.question, "category": q.category,
            "samples": len(by_q.get(q.index, [])),
            "correct": sum(t.correct for t in by_q.get(q.index, [])),
            "thinking_tokens": [t.thinking_tokens for t in by_q.get(q.index, [])],
            "trace_chars": [len(t.thinking) for t in by_q.get(q.index, [])],
            "kept": False, "dropped_at": None,
        }
        for q in pool
    }  # fmt: skip
    stages: dict[str, Any] = {
        "pool": len(pool),
        "traces": len(traces),
        "verified": {"correct_traces": sum(t.correct for t in traces),
                     "questions_with_a_correct_sample": sum(1 for r in per_q.values()
                                                            if r["correct"])},
    }  # fmt: skip

    def drop(index: int, stage: str) -> None:
        per_q[index]["dropped_at"] = stage

    # Quality: malformed and unfinished traces, then duplicate questions.
    malformed = unfinished = 0
    good: dict[int, list[Trace]] = {}
    for index, ts in by_q.items():
        for t in ts:
            if not t.thinking.strip() or not t.attempt.strip():
                malformed += 1
            elif curation.drop_forced_end and (t.forced_end or t.finish_reason == "length"):
                unfinished += 1
            else:
                good.setdefault(index, []).append(t)
    seen: set[str] = set()
    duplicates = 0
    for q in pool:
        key = _normalise(q.question)
        if key in seen:
            duplicates += 1
            good.pop(q.index, None)
            drop(q.index, "quality")
        seen.add(key)
    for q in pool:
        if q.index not in good and per_q[q.index]["dropped_at"] is None:
            drop(q.index, "quality")
    stages["quality"] = {
        "malformed": malformed,
        "missing_end_of_thinking": unfinished,
        "duplicate_questions": duplicates,
        "questions_kept": len(good),
    }

    # Correctness: enough right samples; the trace kept is a right one when there is one.
    kept: dict[int, Trace] = {}
    for index, ts in good.items():
        right = [t for t in ts if t.correct]
        if len(right) < curation.min_correct:
            drop(index, "correctness")
            continue
        kept[index] = max(right or ts, key=lambda t: (t.thinking_tokens, len(t.thinking)))
    stages["correctness"] = {
        "min_correct": curation.min_correct,
        "dropped": len(good) - len(kept),
        "questions_kept": len(kept),
    }

    # Difficulty: what the weaker model gets right is too easy; longest thinking first.
    difficulty: dict[str, Any] = {
        "weaker_model": curation.weaker.model if curation.weaker else None
    }
    if weaker_correct is not None:
        easy = [i for i in kept if weaker_correct.get(i)]
        for i in easy:
            drop(i, "difficulty")
            del kept[i]
        difficulty["solved_by_weaker"] = len(easy)
    order = sorted(kept, key=lambda i: (-kept[i].thinking_tokens, -len(kept[i].thinking), i))
    if not curation.rank_by_length:
        order = sorted(kept)
        random.Random(seed).shuffle(order)
    difficulty |= {"ranked_by_length": curation.rank_by_length, "questions_kept": len(kept)}
    stages["difficulty"] = difficulty

    # Diversity: take from each category in turn (categories in a seeded random order).
    chosen = _round_robin(order, {i: str(per_q[i]["category"]) for i in order}, seed,
                          curation.max_examples)  # fmt: skip
    for i in order:
        if i not in chosen:
            drop(i, "diversity")
    categories = {str(per_q[i]["category"]) for i in chosen}
    stages["diversity"] = {
        "category_field": curation.category_field,
        "categories": len(categories),
        "max_examples": curation.max_examples,
        "dropped": len(order) - len(chosen),
        "questions_kept": len(chosen),
    }
    stages["final"] = len(chosen)

    rows = []
    by_index = {q.index: q for q in pool}
    for i in chosen:
        per_q[i]["kept"] = True
        q, t = by_index[i], kept[i]
        rows.append({
            "question": q.question, "solution": q.reference,
            "thinking_trajectories": [t.thinking], "attempt": t.attempt,
            "metadata": {"index": i, "sample": t.sample, "correct": t.correct,
                         "thinking_tokens": t.thinking_tokens, "category": q.category},
        })  # fmt: skip
    return rows, stages, [per_q[q.index] for q in pool]


def _round_robin(
    order: list[int], category: dict[int, str], seed: int, limit: int | None
) -> list[int]:
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(category[i], []).append(i)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    chosen: list[int] = []
    limit = len(order) if limit is None else limit
    while len(chosen) < limit and any(groups.values()):
        for name in names:
            if groups[name] and len(chosen) < limit:
                chosen.append(groups[name].pop(0))
    return chosen


# ---------------------------------------------------------------- the run


def _sampling(config: DistillConfig, temperature: float) -> dict[str, Any]:
    return {"temperature": temperature, "max_completion_tokens": config.max_completion_tokens,
            "seed": config.seed, "thinking": config.thinking}  # fmt: skip


def run_distill(
    config: DistillConfig, out: Path, emit: Emit, *, generate: Generate = ray_generate
) -> dict[str, Any]:
    """Generate, verify and curate; writes the files named in the module docstring and
    returns results.json's content. TeacherFailed leaves traces.jsonl with the done part."""
    out.mkdir(parents=True, exist_ok=True)
    curation = config.curation
    pool = load_pool(config.dataset, curation.category_field)
    total = len(pool) * config.samples
    emit("started", f"distilling {len(pool)} questions x {config.samples} samples from "
         f"{config.teacher.model}", questions=len(pool), samples=config.samples)  # fmt: skip
    sink = out / TRACES_FILE
    sink.write_text("")
    started = time.perf_counter()
    rows = generate(pool, config.samples, config.teacher, config,
                    sampling=_sampling(config, config.temperature))  # fmt: skip
    try:
        traces = collect(rows, total, emit, sink)
    except TeacherFailed as exc:
        emit(
            "teacher_failed", f"the teacher failed: {exc.done} of {exc.total} traces were done "
            f"and are kept", level="error", done=exc.done, total=exc.total, error=str(exc),
        )  # fmt: skip
        raise
    duration = time.perf_counter() - started
    right = sum(t.correct for t in traces)
    emit("verified", f"{right} of {len(traces)} traces answer right", correct=right,
         traces=len(traces))  # fmt: skip
    weaker = None
    if curation.weaker is not None:
        weaker = _ask_weaker(config, pool, traces, out, emit, generate)
    curated, stages, per_question = curate(
        pool, traces, curation, seed=config.seed, weaker_correct=weaker
    )
    for stage in ("quality", "correctness", "difficulty", "diversity"):
        emit("stage", f"{stage}: {stages[stage]['questions_kept']} questions kept",
             stage=stage, **stages[stage])  # fmt: skip
    with open(out / CURATED_FILE, "w", encoding="utf-8") as fh:
        for row in curated:
            fh.write(json.dumps(row) + "\n")
    results = {
        "stages": stages, "questions": per_question,
        "counts": {"questions": len(pool), "traces": len(traces), "correct_traces": right,
                   "kept": len(curated)},
        "generation": {"duration_s": round(duration, 3),
                       "traces_per_s": round(len(traces) / max(duration, 1e-9), 3),
                       "thinking_tokens": sum(t.thinking_tokens for t in traces),
                       "completion_tokens": sum(t.completion_tokens for t in traces)},
    }  # fmt: skip
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    emit("finished", f"{len(curated)} examples curated from {len(traces)} traces",
         kept=len(curated), traces=len(traces))  # fmt: skip
    return results


def _ask_weaker(
    config: DistillConfig, pool: Sequence[PoolQuestion], traces: Sequence[Trace], out: Path,
    emit: Emit, generate: Generate,
) -> dict[int, bool]:  # fmt: skip
    """Whether the weaker model answers each question right (greedy, one sample), asked
    only for questions the teacher answered at all."""
    assert config.curation.weaker is not None
    asked = {t.index for t in traces if t.attempt.strip()}
    subset = [q for q in pool if q.index in asked]
    if not subset:
        return {}
    sink = out / "weaker.jsonl"
    sink.write_text("")
    rows = generate(subset, 1, config.curation.weaker, config, sampling=_sampling(config, 0.0))
    found = collect(rows, len(subset), emit, sink, what="weaker-model answers")
    return {t.index: t.correct for t in found}


def log_to_mlflow(
    results: dict[str, Any], config: DistillConfig, out: Path, *, tracking_uri: str,
    distill_id: str, artifact_location: str | None = None,
) -> str:  # fmt: skip
    """One run in the ``thinkforge-distill`` experiment: the lineage as params, the
    counts as metrics, the curated file and results as artifacts."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name("thinkforge-distill")
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment("thinkforge-distill", artifact_location=artifact_location)
    )
    # The curated file's hash, as a training run tags the data it trained on: the two
    # runs meet on it in MLflow (and in the registry lineage the API shows).
    tags = {DISTILL_TAG: distill_id, DATASET_SHA_TAG: sha256_file(out / CURATED_FILE)}
    run = client.create_run(experiment_id, run_name=distill_id, tags=tags)
    run_id: str = run.info.run_id
    now = int(time.time() * 1000)
    params = {"teacher": config.teacher.model, "samples": str(config.samples),
              "seed": str(config.seed), "temperature": str(config.temperature),
              "thinking": json.dumps(config.thinking),
              "curation": config.curation.model_dump_json()[:6000]}  # fmt: skip
    metrics = [Metric(k, float(v), now, 0) for k, v in results["counts"].items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    for name in (RESULTS_FILE, CURATED_FILE):
        client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id)
    return run_id


# ---------------------------------------------------------------- entrypoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m thinkforge.jobs.distill")
    parser.add_argument("--distill-id", required=True)
    parser.add_argument("--config-json", required=True, help="a DistillConfig as JSON")
    parser.add_argument("--output", required=True)
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--mlflow-artifact-root", default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 with the outputs written; else 1, the reason last on stderr as
    ``thinkforge job error: ...``."""
    args = parse_args(argv)
    out = Path(args.output)
    emit = EventLog(out / EVENTS_FILE, args.distill_id)
    try:
        config = DistillConfig.model_validate_json(args.config_json)
        results = run_distill(config, out, emit)
        if args.mlflow_uri:
            results["mlflow_run_id"] = log_to_mlflow(
                results, config, out, tracking_uri=args.mlflow_uri, distill_id=args.distill_id,
                artifact_location=args.mlflow_artifact_root,
            )  # fmt: skip
            (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    except TeacherFailed as exc:
        message = f"{exc} ({exc.done} of {exc.total} traces done, kept in {TRACES_FILE})"
    except ValidationError as exc:
        message = f"invalid --config-json: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    except (OSError, ValueError) as exc:
        message = str(exc)
    emit_error(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
