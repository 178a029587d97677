"""The evaluation runner against a real OpenAI-compatible server: one Ray Serve front door
(``thinkforge.serve.app.build_app``) serving a tiny untrained model, graded per budget,
plotted, logged to a real MLflow store (sqlite), and run as the job entrypoint.

The untrained model never answers on its own, so correctness is made deterministic with
``final_answer_prefix``: at a forced end the server writes "Answer: 7" into the answer,
and exactly the questions whose reference is 7 (in any accepted spelling) are correct.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.conftest import free_port, seed_mlflow_store
from tests.serve.conftest import save_tiny_model
from thinkforge.jobs.evaluate import (
    BudgetPoint,
    EvalConfig,
    EvalResult,
    families,
    load_questions,
    log_to_mlflow,
    plot,
    run_eval,
    summarize,
)

PREFIX = "Answer: 7\n"
BUDGETS: list[dict[str, Any]] = [
    {"max_tokens": 0, "final_answer_prefix": PREFIX},
    {"max_tokens": 3, "final_answer_prefix": PREFIX},
    {"max_tokens": 6, "num_waits": 1},
]
ROWS: list[dict[str, Any]] = [
    {"question": "Sum: 3 4", "answer": "7"},  # plain
    {"question": "Sum: 3 5", "thinking_trajectories": ["3+5=8"], "attempt": "8"},  # s1K
    {"question": "Sum: 2 5", "solution": "2+5 is $\\boxed{7}$.", "answer": "7"},  # LIMO
    {"problem": "Sum: 1 6", "answer": "7.0"},  # MATH-style
    {
        "messages": [
            {"role": "user", "content": "Sum: 4 5"},
            {"role": "assistant", "content": "Answer: 9"},
        ]
    },  # chat
    {"question": "Sum: 6 1", "solution": "So the total is \\boxed{\\frac{14}{2}}."},  # s1K
]
EXPECTED_CORRECT = [True, False, True, True, False, True]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_load_questions_accepts_every_format(dataset: Path) -> None:
    questions = load_questions(dataset)
    assert [q.question for q in questions][:2] == ["Sum: 3 4", "Sum: 3 5"]
    assert [q.reference for q in questions][1:5] == ["8", "7", "7.0", "Answer: 9"]
    assert questions[4].messages == [{"role": "user", "content": "Sum: 4 5"}]
    assert len(load_questions(dataset, limit=2)) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q"}', "line 2: expected {question, answer}"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "line 2: a chat row must end"),
        ("not json", "line 2:"),
    ],
)
def test_load_questions_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_questions(path)


def test_config_rejects_unbounded_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        EvalConfig(dataset="d", base_url="u", model="m", concurrency=1000)
    with pytest.raises(ValueError, match="budgets must be distinct"):
        EvalConfig(dataset="d", base_url="u", model="m", budgets=[{}, {"max_tokens": None}])


def test_entrypoint_rejects_a_bad_config_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "thinkforge.jobs.evaluate", "--eval-id", "ev-bad"]
    cmd += ["--config-json", '{"dataset": "d.jsonl"}', "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("thinkforge job error: invalid --config-json: ('model',): Field required")
    )
    with pytest.raises(ValidationError, match="exactly one of base_url"):
        EvalConfig(dataset="d", model="m")
    with pytest.raises(ValidationError, match="exactly one of base_url"):
        EvalConfig(dataset="d", model="m", base_url="u", model_uri="models:/m/1")


def test_plot_families_split_budget_caps_from_forced_waits() -> None:
    def point(thinking: dict[str, Any], tokens: float) -> Any:
        return summarize(BudgetPoint.model_validate(thinking), []).model_copy(
            update={"avg_thinking_tokens": tokens}
        )

    full, cap, waits = point({}, 14), point({"max_tokens": 4}, 4), point({"num_waits": 1}, 35)
    both = point({"max_tokens": 64, "num_waits": 2}, 50)
    got = families([waits, full, both, cap])
    assert {k: [b.budget for b in v] for k, v in got.items()} == {
        "thinking budget": ["max_tokens=4", "full"],
        "forced waits": ["full", "num_waits=1", "max_tokens=64,num_waits=2"],
    }
    assert list(families([cap, full])) == ["thinking budget"]  # no waits: one curve


def test_evaluate_never_imports_the_control_plane() -> None:
    code = (
        "import sys, thinkforge.jobs.evaluate, thinkforge.jobs.answers; "
        "bad = [m for m in sys.modules "
        "       if m == 'sqlalchemy' or m.startswith('thinkforge.platform')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unreachable_endpoint_is_recorded_and_fails_the_job(dataset: Path, tmp_path: Path) -> None:
    config = {
        "dataset": str(dataset),
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "model": "tiny",
        "max_retries": 0,
        "limit": 2,
    }
    cmd = [sys.executable, "-m", "thinkforge.jobs.evaluate", "--eval-id", "ev-down"]
    cmd += ["--config-json", json.dumps(config), "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkforge job error: every request failed, e.g. APIConnectionError")
    result = EvalResult.model_validate_json((tmp_path / "results.json").read_text())
    assert result.budgets[0].errors == 2 and result.budgets[0].accuracy == 0
    assert all("APIConnectionError" in (r.error or "") for r in result.results)


# ---------------------------------------------------------------- against Ray Serve


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-eval"), hidden_size=64, biased=False)


@pytest.fixture(scope="module")
def base_url(model_dir: Path) -> Iterator[str]:
    """Ray (2 CPUs) and one Serve front door with the tiny model; yields the /v1 URL."""
    import ray
    from ray import serve

    from thinkforge.serve.app import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = {
        "name": "tiny",
        "model_path": str(model_dir),
        "num_cpus": 0.5,
        "max_ongoing_requests": 4,
        "max_queued_requests": 16,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2},
        "max_batch_size": 4,
        "max_completion_tokens": 64,
        "request_timeout_s": 60,
    }
    try:
        serve.run(build_app({"models": [model], "ingress": {"num_cpus": 0}}), name="eval")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def eval_config(dataset: Path, base_url: str, **overrides: Any) -> dict[str, Any]:
    config = {
        "dataset": str(dataset),
        "base_url": base_url,
        "model": "tiny",
        "budgets": BUDGETS,
        "max_completion_tokens": 24,
        "concurrency": 4,
    }
    return config | overrides


@pytest.fixture(scope="module")
def result(dataset: Path, base_url: str) -> EvalResult:
    return run_eval(EvalConfig.model_validate(eval_config(dataset, base_url)))


@pytest.mark.ray
@pytest.mark.slow
def test_per_budget_accuracy_and_thinking_tokens(result: EvalResult) -> None:
    assert [b.budget for b in result.budgets] == [
        f"max_tokens=0,final_answer_prefix={PREFIX}",
        f"max_tokens=3,final_answer_prefix={PREFIX}",
        "max_tokens=6,num_waits=1",
    ]
    assert result.questions == len(ROWS) and len(result.results) == 3 * len(ROWS)
    assert all(r.error is None for r in result.results)
    assert result.model_versions == []  # a local directory is no registry version
    forced = [r for r in result.results if r.forced_end and "prefix" in r.budget]
    assert forced and all(r.content.startswith(PREFIX) for r in forced)
    zero, three, six = result.budgets
    assert zero.avg_thinking_tokens == 0 and zero.forced_end_rate == 1
    assert [r.correct for r in result.results[: len(ROWS)]] == EXPECTED_CORRECT
    assert zero.accuracy == pytest.approx(sum(EXPECTED_CORRECT) / len(ROWS))
    for summary, cap in ((three, 3), (six, 6)):
        per_q = [r for r in result.results if r.budget == summary.budget]
        assert all(r.thinking_tokens <= cap for r in per_q)
        assert summary.accuracy == sum(r.correct for r in per_q) / len(per_q)
        assert summary.avg_thinking_tokens == sum(r.thinking_tokens for r in per_q) / len(per_q)
    # At a forced end the prefix decides; a model that ends thinking itself gets no prefix.
    assert all(
        r.correct == EXPECTED_CORRECT[r.index]
        for r in result.results
        if r.budget == three.budget and r.forced_end
    )


@pytest.mark.ray
@pytest.mark.slow
def test_plot_is_a_png(result: EvalResult, tmp_path: Path) -> None:
    from PIL import Image

    path = plot(result, tmp_path / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (640, 440)


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_run_has_metrics_and_artifacts(result: EvalResult, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}"
    run_id = log_to_mlflow(
        result, uri, "ev-1", {"eval_id": "ev-1"}, artifact_location=str(tmp_path / "art")
    )
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.tags["eval_id"] == "ev-1" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    key = "accuracy.max_tokens_0.final_answer_prefix_Answer_7"
    assert metrics[key] == pytest.approx(result.budgets[0].accuracy)
    assert metrics["avg_thinking_tokens.max_tokens_6.num_waits_1"] == pytest.approx(
        result.budgets[2].avg_thinking_tokens
    )
    series = client.get_metric_history(run_id, "accuracy")
    assert [m.step for m in series] == [0, 1, 2]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.json", "plot.png", "results_table.json"} <= names
    local = client.download_artifacts(run_id, "results.json", str(tmp_path / "dl"))
    assert EvalResult.model_validate_json(Path(local).read_text()) == result


@pytest.mark.ray
@pytest.mark.slow
def test_entrypoint_writes_results_plot_and_events(
    dataset: Path, base_url: str, tmp_path: Path
) -> None:
    config = eval_config(dataset, base_url, budgets=BUDGETS[:1], limit=3)
    uri = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}"
    cmd = [sys.executable, "-m", "thinkforge.jobs.evaluate", "--eval-id", "ev-2"]
    cmd += ["--config-json", json.dumps(config), "--output", str(tmp_path / "out")]
    cmd += ["--mlflow-uri", uri, "--mlflow-artifact-root", str(tmp_path / "art")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    events = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("THINKFORGE_EVENT ")
    ]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "eval_started" and kinds[-1] == "eval_finished"
    assert "eval_progress" in kinds and "budget_result" in kinds
    finished = events[-1]
    assert finished["errors"] == 0 and finished["mlflow_run_id"]
    result = EvalResult.model_validate_json((tmp_path / "out" / "results.json").read_text())
    assert result.questions == 3 and result.budgets[0].accuracy == pytest.approx(2 / 3)
    assert result.mlflow_run_id == finished["mlflow_run_id"]
    assert (tmp_path / "out" / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_registry_version_is_evaluated_in_process(
    dataset: Path, model_dir: Path, tmp_path: Path
) -> None:
    """No deployment: the version loads through its pyfunc flavor in the evaluating process."""
    from mlflow.tracking import MlflowClient

    from thinkforge.jobs.tracking import register_model

    uri = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    ref = register_model(
        tracking_uri=uri, run_id=run_id, model_dir=model_dir, name="tiny-eval", job_id="j",
        base_model="thinkforge/tiny", dataset_sha256="0" * 64,
    )  # fmt: skip
    assert ref == "tiny-eval/1"
    config = {
        "dataset": str(dataset), "model": "tiny-eval", "model_uri": "models:/tiny-eval/1",
        "tracking_uri": uri, "budgets": BUDGETS[:2], "max_completion_tokens": 24, "limit": 3,
    }  # fmt: skip
    result = run_eval(EvalConfig.model_validate(config))
    assert result.model_versions == [1] and result.base_url == "models:/tiny-eval/1"
    assert len(result.results) == 6 and all(r.error is None for r in result.results)
    zero, three = result.budgets
    assert zero.avg_thinking_tokens == 0 and zero.forced_end_rate == 1
    assert all(r.content.startswith(PREFIX) for r in result.results if r.forced_end)
    assert all(r.thinking_tokens <= 3 for r in result.results if r.budget == three.budget)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_either_reasoning_field_name_is_read(field: str) -> None:
    """vLLM renamed reasoning_content to reasoning: an endpoint sending either is scored."""
    from thinkforge.jobs.evaluate import BudgetPoint, Question, _ask

    message = {"role": "assistant", "content": "Answer: 7", field: "3+4=7"}
    body = {"choices": [{"message": message, "finish_reason": "stop"}], "usage": {}}
    cfg = EvalConfig(dataset="d.jsonl", base_url="http://127.0.0.1:1/v1", model="m")
    question = Question(index=0, messages=[], question="Sum: 3 4", reference="7")
    out = _ask(lambda request: (body, None), cfg, BudgetPoint(max_tokens=4), question)
    assert out.reasoning == "3+4=7" and out.correct and out.error is None
