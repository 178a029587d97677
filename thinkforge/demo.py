"""``make demo``: the whole product on one machine, through the public REST API.

Starts the embedded stack (``thinkforge up``: local Ray, SQLite, file-backed MLflow),
then, as a user would: makes the synthetic running-sum dataset and uploads it, trains
the tiny model with the ``tiny-cpu`` recipe (a progress bar follows the job), promotes
the version to ``production``, deploys it, asks budget-forced questions, runs one
evaluation that sweeps thinking budgets and forced waits and saves the scaling plot. Everything it started is stopped at
the end; a second run starts afresh.

    python -m thinkforge.demo [--train 2000] [--eval 200] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thinkforge.client import Client
from thinkforge.jobs.synthetic import recheck_split, write_records
from thinkforge.platform.ray_cluster import free_port

console = Console()
REPO = Path(__file__).resolve().parents[1]
MARKER = ".thinkforge-demo"
# Both of s1's families in one evaluation: budgets cut thinking short, forced waits
# extend it past where the model would stop (the full budget is 0 waits).
# The natural first pass is about 12 thinking tokens, so max_tokens=3 is a quarter of it.
SWEEP = [{"max_tokens": 0}, {"max_tokens": 3}, {"max_tokens": 6}, {}]
WAITS = [{"num_waits": 1}, {"num_waits": 2}, {"num_waits": 4}]


@dataclass
class DemoResult:
    """What each stage produced; the end-to-end test checks every field."""

    job: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    deployment: dict[str, Any] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    plot: Path | None = None
    addresses: dict[str, str] = field(default_factory=dict)


@contextmanager
def control_plane(data_dir: Path, key: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``thinkforge up`` as a child process; SIGINT on exit stops it and its Ray head."""
    port, serve_port, dash_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(data_dir),
        "THINKFORGE_BOOTSTRAP_API_KEY": key,
        "THINKFORGE_SERVE_PORT": str(serve_port),
        "THINKFORGE_RAY_DASHBOARD_PORT": str(dash_port),
        "THINKFORGE_RAY_NUM_CPUS": os.environ.get("THINKFORGE_RAY_NUM_CPUS", "2"),
        "THINKFORGE_RECIPES_DIR": str(REPO / "recipes"),
        "THINKFORGE_RECONCILE_INTERVAL_S": "1",
    }
    log = open(data_dir / "control-plane.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, data_dir)
        yield (
            url,
            {
                "api": url,
                "serve": f"http://127.0.0.1:{serve_port}/v1",
                "ray_dashboard": f"http://127.0.0.1:{dash_port}",
                "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{data_dir / 'mlflow.db'}",
            },
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    deadline = time.monotonic() + 300  # ready means its local Ray head answers too
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the control plane exited; see {data_dir / 'control-plane.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the control plane did not become ready")


def make_data(data_dir: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    # Issue 17's task: a fallible one-shot first pass, then 0-3 "Wait" rechecks, each
    # redoing the last one-shot line more carefully (half of it one term a step), so each
    # forced wait can fix a mistake (bench/scaling.py measures it).
    train, held_out = recheck_split(n_train, n_eval, seed=0)
    return (
        write_records(data_dir / "datasets" / "sums-train.jsonl", train),
        write_records(data_dir / "datasets" / "sums-heldout.jsonl", held_out),
    )


def train(tf: Client, file_id: str, hyper: dict[str, Any]) -> dict[str, Any]:
    job = tf.create_job(
        {
            "model": "thinkforge/tiny", "training_file": file_id, "recipe": "tiny-cpu",
            "suffix": "sums", "metadata": {"source": "make demo"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        }
    )  # fmt: skip
    console.print(f"  job [bold]{job['id']}[/bold] submitted (recipe tiny-cpu)")
    columns = (
        TextColumn("  {task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("queued", total=None, info="")
        while True:
            job = tf.get_job(job["id"])
            steps = [
                e["data"]
                for e in tf.list_events(job["id"], limit=100)["data"]
                if e["type"] == "metrics"
            ]
            if steps:
                last = max(steps, key=lambda d: d["step"])
                total = last.get("total_steps") or progress.tasks[0].total
                progress.update(
                    task,
                    completed=last["step"],
                    total=total,
                    info=f"loss {last.get('loss', 0):.3f}",
                )
            progress.update(task, description=job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1)


def ask(
    serve_url: str, key: str, model: str, question: str, thinking: dict[str, Any]
) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=serve_url, api_key=key)  # the front door needs a project key
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0,
        max_completion_tokens=256, extra_body={"thinking": thinking},
    )  # fmt: skip
    message = resp.choices[0].message
    extra = message.model_extra or {}
    return {
        "question": question,
        "thinking_params": thinking,
        "reasoning": extra.get("reasoning_content") or "",
        "answer": message.content or "",
        "summary": (resp.model_extra or {}).get("thinking", {}),
    }


def show_answer(a: dict[str, Any]) -> None:
    console.print(
        f"\n  [bold]Q:[/bold] {a['question']}   [cyan]thinking={a['thinking_params']}[/cyan]"
    )
    console.print(f"  [dim italic]{a['reasoning'].strip()}[/dim italic]")
    console.print(
        f"  [bold green]A:[/bold green] {a['answer'].strip()}   [dim]{a['summary']}[/dim]"
    )


def evaluate(tf: Client, deployment: str, file_id: str, n_eval: int) -> dict[str, Any]:
    budgets = [*SWEEP, *WAITS]
    ev = tf.create_eval(
        {"deployment": deployment, "dataset": file_id, "budgets": budgets, "limit": n_eval,
         "max_completion_tokens": 160, "concurrency": 16},
    )  # fmt: skip
    console.print(
        f"  evaluation [bold]{ev['id']}[/bold]: {n_eval} questions x {len(budgets)} budgets"
    )
    with console.status("  evaluating..."):
        return tf.wait_for_eval(ev["id"])


def run(args: argparse.Namespace) -> DemoResult:
    data_dir = Path(args.data_dir).absolute()
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise SystemExit(f"{data_dir} is not empty and not a demo folder: pick another --data-dir")
    shutil.rmtree(data_dir, ignore_errors=True)  # the demo's own folder: every run starts afresh
    data_dir.mkdir(parents=True)
    (data_dir / MARKER).write_text("made by `make demo`; the next run deletes this folder\n")
    result = DemoResult()
    key = "tf-demo-" + secrets.token_hex(16)
    console.rule("[bold]thinkforge demo")
    console.print(f"1. starting the embedded stack in {data_dir} (local Ray, SQLite, MLflow)")
    with control_plane(data_dir, key) as (url, addresses), Client(url, key) as tf:
        result.addresses = addresses
        train_path, eval_path = make_data(data_dir, args.train, args.eval)
        console.print(f"2. uploading {args.train} synthetic running-sum problems (s1K format)")
        train_file = tf.upload_file(train_path)["id"]
        eval_file = tf.upload_file(eval_path)["id"]
        console.print("3. fine-tuning the tiny Qwen2 model on Ray Train (2 DDP workers)")
        hyper = {
            k: v for k, v in {"n_epochs": args.epochs, "max_steps": args.max_steps}.items() if v
        }
        result.job = train(tf, train_file, hyper)
        if result.job["status"] != "succeeded":
            raise RuntimeError(f"training {result.job['status']}: {result.job['error']}")
        result.version = result.job["fine_tuned_model"]
        name, version = result.version.split("/")
        console.print(f"4. registered [bold]{result.version}[/bold]; promoting it to production")
        tf.promote(name, "production", int(version), reason="make demo")
        console.print(f"5. deploying {name}@production on Ray Serve")
        tf.create_deployment(
            {"name": name, "model": f"{name}@production", "max_completion_tokens": 256}
        )
        result.deployment = tf.wait_for_deployment(name)
        console.print("6. budget-forced requests (thinking dim, answer green):")
        held_out = [json.loads(line)["question"] for line in eval_path.read_text().splitlines()]
        probes = [
            (held_out[0], {"max_tokens": 64}),
            (held_out[0], {"max_tokens": 2}),
            (held_out[0], {"max_tokens": 128, "num_waits": 2}),  # the same question, rechecked
        ]
        for question, thinking in probes:
            answer = ask(addresses["serve"], key, name, question, thinking)
            result.answers.append(answer)
            show_answer(answer)
        console.print("\n7. thinking-budget sweep on held-out questions")
        result.evaluation = evaluate(tf, name, eval_file, args.eval)
        if result.evaluation["status"] == "succeeded":
            result.plot = data_dir / "scaling.png"
            result.plot.write_bytes(
                tf.http.get(f"/v1/evals/{result.evaluation['id']}/plot.png").content
            )
        show_eval(result.evaluation)
        console.print("\n  addresses while it ran:")
        for label, value in addresses.items():
            console.print(f"    {label:14s} {value}")
    console.print(f"\nscaling plot: [bold]{result.plot}[/bold]")
    console.print(f"MLflow UI:    {addresses['mlflow_ui']}")
    console.print("everything the demo started has stopped.")
    return result


def show_eval(ev: dict[str, Any]) -> None:
    if ev["status"] != "succeeded":
        console.print(f"  [red]evaluation {ev['status']}: {ev.get('error')}[/red]")
        return
    # s1's two families: caps cut thinking short; waits extend it past the natural stop.
    table = Table("family", "thinking budget", "accuracy", "avg thinking tokens", "waits")
    for b in ev["budgets"]:
        thinking = b.get("thinking") or {}
        family = "forced waits" if thinking.get("num_waits") else "thinking budget"
        table.add_row(
            "natural" if not thinking else family,
            b["budget"],
            f"{b['accuracy']:.0%}",
            f"{b['avg_thinking_tokens']:.1f}",
            f"{b['avg_waits']:.1f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinkforge.demo", description=__doc__)
    parser.add_argument("--data-dir", default=".thinkforge/demo")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems")
    parser.add_argument(
        "--epochs", type=int, default=16, help="16: enough for the scaling curve (recipe: 2)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop training early")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
