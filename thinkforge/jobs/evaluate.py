"""Test-time-scaling evaluation: accuracy against thinking budget over an OpenAI endpoint.

Sends every question of a JSONL dataset to an OpenAI-compatible chat endpoint (the Serve
front door, e.g. ``http://127.0.0.1:8100/v1``) once per budget of a sweep, with the
budget as the ``thinking`` request extension, grades the answers with
``thinkforge.jobs.answers`` and reports per-budget accuracy against average thinking
tokens: the s1 paper's scaling figure. Pure of the control plane (no database, no Ray):

    cfg = EvalConfig(dataset="test.jsonl", base_url="http://127.0.0.1:8100/v1",
                     model="s1-tiny", budgets=[{"max_tokens": 4}, {}, {"num_waits": 1}])
    result = run_eval(cfg)
    plot(result, "plot.png"); run_id = log_to_mlflow(result, tracking_uri=uri)

As a job (what the control plane submits to Ray), writing ``results.json`` and
``plot.png`` to the output folder and ``THINKFORGE_EVENT {json}`` progress lines:

    python -m thinkforge.jobs.evaluate --eval-id ev-1 --config-json '{...}' \\
        --mlflow-uri sqlite:///mlflow.db --output out/

Dataset rows: ``{question, answer}`` (also LIMO rows), s1K ``{question, solution}`` /
``{question, attempt}``, MATH-style ``{problem, answer}``, or chat ``{messages}`` whose
last assistant turn holds the reference answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from thinkforge.contract import EVAL_TAG, PLOT_FILE, RESULTS_FILE, emit_error, emit_event
from thinkforge.jobs.answers import extract_answer, is_correct
from thinkforge.serve.config import VERSION_HEADER

__all__ = [
    "BudgetPoint",
    "BudgetSummary",
    "EvalConfig",
    "EvalResult",
    "Question",
    "QuestionResult",
    "families",
    "load_questions",
    "log_to_mlflow",
    "main",
    "plot",
    "run_eval",
    "summarize",
]


Progress = Callable[[int, int], None]


class BudgetPoint(BaseModel):
    """One point of the sweep: the ``thinking`` extension sent with every question.
    All unset: thinking is not capped (``max_completion_tokens`` still bounds it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    num_waits: int | None = Field(default=None, ge=0, le=1000)
    wait_string: str | None = Field(default=None, min_length=1, max_length=200)
    final_answer_prefix: str | None = Field(default=None, max_length=200)

    def thinking(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    @property
    def label(self) -> str:
        """``full``, ``max_tokens=4``, ``max_tokens=64,num_waits=1``, ..."""
        fields = self.thinking()
        return ",".join(f"{k}={v}" for k, v in fields.items()) if fields else "full"

    @property
    def key(self) -> str:
        """The label in MLflow's metric-name alphabet: ``max_tokens_4.num_waits_1``."""
        fields = self.thinking()
        parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", f"{k}_{v}").strip("_") for k, v in fields.items()]
        return ".".join(parts)[:200] if parts else "full"


class EvalConfig(BaseModel):
    """One evaluation: what to ask, whom, and at which thinking budgets."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, description="JSONL of questions with reference answers")
    base_url: str | None = Field(
        default=None, min_length=1, description="OpenAI-compatible base URL, .../v1"
    )
    model_uri: str | None = Field(
        default=None,
        pattern=r"^models:/",
        description="instead of base_url: a registry version, loaded in this process "
        "(thinkforge.serve.pyfunc: the same engine and budget forcing as Serve)",
    )
    tracking_uri: str | None = Field(default=None, description="MLflow, for model_uri")
    model: str = Field(min_length=1, description="the request's model name")
    api_key: str | None = Field(default=None, description="bearer key, if the endpoint wants one")
    budgets: list[BudgetPoint] = Field(default_factory=lambda: [BudgetPoint()], min_length=1)
    max_completion_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    concurrency: int = Field(default=8, ge=1, le=64, description="requests in flight at once")
    limit: int | None = Field(default=None, ge=1, description="the first N questions only")
    seed: int = Field(default=0, ge=0, description="sent as each request's sampling seed")
    request_timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)

    @model_validator(mode="after")
    def _one_target(self) -> EvalConfig:
        if (self.base_url is None) == (self.model_uri is None):
            raise ValueError("give exactly one of base_url (a deployment) and model_uri")
        return self

    @model_validator(mode="after")
    def _distinct_budgets(self) -> EvalConfig:
        labels = [b.label for b in self.budgets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"budgets must be distinct: {labels}")
        return self


class Question(BaseModel):
    index: int
    messages: list[dict[str, str]]
    question: str
    reference: str


class QuestionResult(BaseModel):
    """One question at one budget."""

    budget: str
    index: int
    question: str
    reference: str
    prediction: str | None = None  # the extracted final answer
    content: str = ""  # message.content
    reasoning: str = ""  # message.reasoning_content (or .reasoning)
    correct: bool = False
    thinking_tokens: int = 0
    waits: int = 0
    forced_end: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    model_version: int | None = None  # the registry version that answered, when it says
    error: str | None = None


class BudgetSummary(BaseModel):
    budget: str
    key: str
    thinking: dict[str, Any]
    questions: int
    correct: int
    accuracy: float
    avg_thinking_tokens: float
    avg_waits: float
    forced_end_rate: float
    errors: int


class EvalResult(BaseModel):
    model: str
    base_url: str
    dataset: str
    questions: int
    duration_s: float
    budgets: list[BudgetSummary]
    results: list[QuestionResult]
    # Every registry version that answered: one, unless the deployment rolled mid-sweep.
    model_versions: list[int] = []
    mlflow_run_id: str | None = None  # set by the job entrypoint once it has logged the run

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


# ---------------------------------------------------------------- dataset


def _row_to_question(index: int, row: dict[str, Any]) -> Question:
    if "messages" in row:
        turns = [m for m in row["messages"] if isinstance(m, dict)]
        if not turns or turns[-1].get("role") != "assistant":
            raise ValueError("a chat row must end with the assistant turn holding the answer")
        prompt = [{"role": m["role"], "content": m["content"]} for m in turns[:-1]]
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users:
            raise ValueError("a chat row needs a user message")
        return Question(
            index=index, messages=prompt, question=users[-1], reference=turns[-1]["content"]
        )
    question = row.get("question") or row.get("problem")
    reference = next((row[k] for k in ("answer", "solution", "attempt") if row.get(k)), None)
    if not isinstance(question, str) or reference is None:
        raise ValueError(
            "expected {question, answer}, s1K {question, solution or attempt}, "
            "{problem, answer} or chat {messages}"
        )
    messages = [{"role": "user", "content": question}]
    return Question(index=index, messages=messages, question=question, reference=str(reference))


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Questions with reference answers, in file order; ValueError names a bad line."""
    questions: list[Question] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                questions.append(_row_to_question(len(questions), json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}, line {lineno}: {exc}") from None
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


# ---------------------------------------------------------------- running


Asker = Callable[[dict[str, Any]], tuple[dict[str, Any], int | None]]


def _ask(ask: Asker, cfg: EvalConfig, point: BudgetPoint, q: Question) -> QuestionResult:
    out = QuestionResult(
        budget=point.label, index=q.index, question=q.question, reference=q.reference
    )
    request = {
        "messages": q.messages,
        "temperature": cfg.temperature,
        "max_completion_tokens": cfg.max_completion_tokens,
        "seed": cfg.seed,
        "thinking": point.thinking(),
    }
    started = time.perf_counter()
    try:
        body, out.model_version = ask(request)
    except Exception as exc:  # an endpoint error or a rejected request: recorded, not fatal
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.latency_s = time.perf_counter() - started
    choice = body["choices"][0]
    out.content = choice["message"].get("content") or ""
    message = choice["message"]  # vLLM renamed reasoning_content to reasoning: read either
    out.reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    out.finish_reason = choice.get("finish_reason")
    out.prediction = extract_answer(out.content)
    out.correct = is_correct(out.content, q.reference)
    _read_thinking(body, out)
    return out


def _http_asker(client: Any, cfg: EvalConfig) -> Asker:
    """Through an OpenAI-compatible endpoint (a Serve deployment)."""

    def ask(request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        thinking = request.pop("thinking")
        raw = client.chat.completions.with_raw_response.create(
            model=cfg.model, **request, extra_body={"thinking": thinking}
        )
        version = raw.headers.get(VERSION_HEADER, "")
        return raw.parse().model_dump(), int(version) if version.isdigit() else None

    return ask


def _local_asker(cfg: EvalConfig) -> Asker:
    """A registry version in this process, through its pyfunc flavor."""
    import mlflow.pyfunc

    assert cfg.model_uri is not None
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    model = mlflow.pyfunc.load_model(cfg.model_uri)
    version = cfg.model_uri.rpartition("/")[2]

    def ask(request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        (answer,) = model.predict([request])
        return answer, int(version) if version.isdigit() else None

    return ask


def _read_thinking(body: dict[str, Any], out: QuestionResult) -> None:
    """thinkforge's ``thinking`` summary, else OpenAI's usage reasoning_tokens."""
    usage = body.get("usage") or {}
    out.completion_tokens = usage.get("completion_tokens") or 0
    summary = body.get("thinking")
    if isinstance(summary, dict):
        out.thinking_tokens = int(summary.get("tokens", 0))
        out.waits = int(summary.get("waits_inserted", 0))
        out.forced_end = bool(summary.get("forced_end", False))
    else:
        details = usage.get("completion_tokens_details") or {}
        out.thinking_tokens = details.get("reasoning_tokens") or 0


def summarize(point: BudgetPoint, results: Sequence[QuestionResult]) -> BudgetSummary:
    n = len(results)
    correct = sum(r.correct for r in results)
    return BudgetSummary(
        budget=point.label,
        key=point.key,
        thinking=point.thinking(),
        questions=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        avg_thinking_tokens=sum(r.thinking_tokens for r in results) / n if n else 0.0,
        avg_waits=sum(r.waits for r in results) / n if n else 0.0,
        forced_end_rate=sum(r.forced_end for r in results) / n if n else 0.0,
        errors=sum(r.error is not None for r in results),
    )


def run_eval(config: EvalConfig, *, progress: Progress | None = None) -> EvalResult:
    """Ask every question at every budget, ``concurrency`` requests at a time."""
    import openai

    questions = load_questions(config.dataset, config.limit)
    done_with: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if config.base_url is not None:
        client = openai.OpenAI(
            base_url=config.base_url,
            # The control plane hands its run a key of the project in the environment.
            api_key=config.api_key or os.environ.get("THINKFORGE_API_KEY") or "unused",
            timeout=config.request_timeout_s,
            max_retries=config.max_retries,
        )
        ask, workers, done_with = _http_asker(client, config), config.concurrency, client
    else:  # one engine in this process: questions one after another
        ask, workers = _local_asker(config), 1
    started = time.perf_counter()
    jobs = [(p, q) for p in config.budgets for q in questions]
    by_label: dict[str, list[QuestionResult]] = {p.label: [] for p in config.budgets}
    with done_with, ThreadPoolExecutor(workers, thread_name_prefix="eval") as pool:
        futures = [pool.submit(_ask, ask, config, p, q) for p, q in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            by_label[result.budget].append(result)
            if progress is not None:
                progress(done, len(jobs))
    results = [r for p in config.budgets for r in sorted(by_label[p.label], key=_index)]
    return EvalResult(
        model=config.model,
        base_url=config.base_url or config.model_uri or "",
        dataset=config.dataset,
        questions=len(questions),
        duration_s=time.perf_counter() - started,
        budgets=[summarize(p, by_label[p.label]) for p in config.budgets],
        results=results,
        model_versions=sorted({r.model_version for r in results if r.model_version is not None}),
    )


def _index(result: QuestionResult) -> int:
    return result.index


# ---------------------------------------------------------------- reporting


def families(budgets: Sequence[BudgetSummary]) -> dict[str, list[BudgetSummary]]:
    """s1's two scaling families, each sorted by thinking tokens: forced waits (points
    with ``num_waits``) and the rest (budget caps); the uncapped ``full`` point is the
    top of the budget curve and the 0-wait start of the waits curve."""
    waits = [b for b in budgets if b.thinking.get("num_waits")]
    capped = [b for b in budgets if not b.thinking.get("num_waits")]
    out = {"thinking budget": capped}
    if waits:
        out["forced waits"] = [b for b in capped if not b.thinking] + waits
    return {k: sorted(v, key=lambda b: (b.avg_thinking_tokens, b.accuracy)) for k, v in out.items()}


def plot(result: EvalResult, path: str | Path) -> Path:
    """Accuracy against average thinking tokens, one labelled point per budget and one
    line per family (budget caps, forced waits), as in s1's Figure 1 (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend, safe in threads and workers
    ax = fig.add_subplot()
    for (name, points), style in zip(families(result.budgets).items(), ("-o", "--s"), strict=False):
        xs = [b.avg_thinking_tokens for b in points]
        ys = [100 * b.accuracy for b in points]
        ax.plot(xs, ys, style, label=name)
        for b, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(b.budget, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("average thinking tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Test-time scaling: {result.model} ({result.questions} questions)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _metrics(result: EvalResult) -> list[tuple[str, float, int]]:
    """(name, value, step): named per budget, and as series stepped by sweep position."""
    out: list[tuple[str, float, int]] = []
    for step, b in enumerate(result.budgets):
        for name in ("accuracy", "avg_thinking_tokens", "avg_waits", "forced_end_rate"):
            value = float(getattr(b, name))
            out += [(f"{name}.{b.key}", value, 0), (name, value, step)]
    return out


def log_to_mlflow(
    result: EvalResult,
    tracking_uri: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    *,
    experiment: str = "thinkforge-eval",
    artifact_location: str | None = None,
) -> str:
    """One MLflow run: params, per-budget metrics, results.json, a table and the plot."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    run_id: str = run.info.run_id
    now = int(time.time() * 1000)
    params = {"model": result.model, "base_url": result.base_url, "dataset": result.dataset}
    params |= {"questions": str(result.questions), "budgets": _budget_labels(result)}
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, s) for k, v, s in _metrics(result)],
        params=[Param(k, v) for k, v in params.items()],
    )
    table = [r.model_dump() for r in result.results]
    client.log_table(run_id, {k: [row[k] for row in table] for k in table[0]}, "results_table.json")
    with tempfile.TemporaryDirectory(prefix="thinkforge-eval-") as tmp:
        result.write(Path(tmp) / RESULTS_FILE)
        plot(result, Path(tmp) / PLOT_FILE)
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id)
    return run_id


def _budget_labels(result: EvalResult) -> str:
    return "; ".join(b.budget for b in result.budgets)[:6000]


# ---------------------------------------------------------------- job entrypoint


def _progress_events(eval_id: str) -> Progress:
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth != last[0]:
            last[0] = tenth
            emit_event("eval_progress", eval_id=eval_id, done=done, total=total)

    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m thinkforge.jobs.evaluate")
    parser.add_argument("--eval-id", required=True)
    parser.add_argument("--config-json", required=True, help="an EvalConfig as JSON")
    parser.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="log a run here when given (default: MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--mlflow-artifact-root", default=None, help="for a new experiment")
    parser.add_argument("--output", required=True, help="folder for results.json and plot.png")
    return parser.parse_args(argv)


def run_job(args: argparse.Namespace) -> EvalResult:
    """Evaluate, write results.json and plot.png, log to MLflow; events along the way."""
    config = EvalConfig.model_validate_json(args.config_json)
    out = Path(args.output)
    emit_event("eval_started", eval_id=args.eval_id, budgets=[b.label for b in config.budgets])
    result = run_eval(config, progress=_progress_events(args.eval_id))
    for b in result.budgets:
        emit_event("budget_result", eval_id=args.eval_id, **b.model_dump(exclude={"thinking"}))
    results_path, plot_path = result.write(out / RESULTS_FILE), plot(result, out / PLOT_FILE)
    run_id = None
    if args.mlflow_uri:
        run_id = log_to_mlflow(
            result,
            args.mlflow_uri,
            run_name=args.eval_id,
            tags={EVAL_TAG: args.eval_id},
            artifact_location=args.mlflow_artifact_root,
        )
        result.mlflow_run_id = run_id
        result.write(results_path)
    emit_event(
        "eval_finished",
        eval_id=args.eval_id,
        results=str(results_path),
        plot=str(plot_path),
        mlflow_run_id=run_id,
        errors=sum(b.errors for b in result.budgets),
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when at least one request was answered; else 1, with the reason last on
    stderr as ``thinkforge job error: ...`` (as ``python -m thinkforge.jobs``)."""
    args = parse_args(argv)
    try:
        result = run_job(args)
    except ValidationError as exc:
        message = f"invalid --config-json: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    except (OSError, ValueError) as exc:
        message = str(exc)
    else:
        if not result.results or any(r.error is None for r in result.results):
            return 0
        message = f"every request failed, e.g. {result.results[0].error}"
    emit_error(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
