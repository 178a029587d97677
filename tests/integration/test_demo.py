"""The `make demo` path end to end, with fewer problems and steps: every stage's result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from thinkforge.demo import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_path(tmp_path: Path) -> None:
    args = argparse.Namespace(
        data_dir=str(tmp_path / "demo"), train=256, eval=12, epochs=1, max_steps=12
    )
    result = run(args)
    assert result.job["status"] == "succeeded" and result.job["fine_tuned_model"] == "sums/1"
    assert result.version == "sums/1"
    assert result.deployment["status"] == "running"
    assert result.deployment["served_version"] == "sums/1"

    assert len(result.answers) == 3
    full, capped, waited = result.answers
    assert capped["summary"]["tokens"] <= 2
    assert full["summary"]["tokens"] <= 64 and waited["summary"]["waits_inserted"] <= 2
    for answer in result.answers:
        assert answer["summary"]["tokens"] >= 0 and isinstance(answer["answer"], str)

    ev = result.evaluation
    assert ev["status"] == "succeeded", ev.get("error")
    assert ev["model_version"] == "sums/1" and ev["mlflow_run_id"]
    answers = json.loads((tmp_path / "demo" / "evals" / ev["id"] / "results.json").read_text())
    assert answers["model_versions"] == [1]  # every answer said which version gave it
    by_budget = {b["budget"]: b for b in ev["budgets"]}
    assert set(by_budget) == {
        "max_tokens=0", "max_tokens=3", "max_tokens=6", "full",
        "num_waits=1", "num_waits=2", "num_waits=4",
    }  # fmt: skip
    assert all(b["questions"] == 12 and 0 <= b["accuracy"] <= 1 for b in by_budget.values())
    assert by_budget["max_tokens=0"]["avg_thinking_tokens"] == 0
    assert by_budget["max_tokens=3"]["avg_thinking_tokens"] <= 3
    assert result.plot is not None and result.plot.read_bytes().startswith(PNG)
    assert result.plot.stat().st_size > 5000

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    run_ = mlflow.get_run(ev["mlflow_run_id"])
    assert any(k.startswith("accuracy") for k in run_.data.metrics)
    assert str(mlflow.get_model_version_by_alias("sums", "production").version) == "1"

    for label in ("api", "ray_dashboard"):  # the demo left nothing running
        with pytest.raises(httpx.TransportError):
            httpx.get(result.addresses[label], timeout=3)
