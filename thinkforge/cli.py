"""The ``thinkforge`` command: run the platform, manage keys, files and fine-tune jobs.

thinkforge up --port 8000                  # API server on the embedded defaults
thinkforge keys create --project default   # prints the new key alone on its last line
thinkforge jobs create --recipe recipes/tiny-cpu.yaml hyperparameters.n_epochs=2
thinkforge jobs events ftjob-… --follow
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Column, Table

from thinkforge.client import APIError, Client

app = typer.Typer(
    help="thinkforge: fine-tune reasoning models on Ray, serve them with budget forcing.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
files_app = typer.Typer(help="Training files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

ApiUrl = Annotated[
    str | None, typer.Option("--api-url", envvar="THINKFORGE_API_URL", help="API base URL")
]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="THINKFORGE_API_KEY", help="API key")
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="data directory (THINKFORGE_DATA_DIR)")
]


def main() -> None:
    try:
        app()
    except APIError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise SystemExit(1) from None


def _settings(data_dir: Path | None = None, **overrides: Any):  # type: ignore[no-untyped-def]
    from thinkforge.platform.settings import Settings

    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)


def _print(obj: Any) -> None:
    console.print_json(json.dumps(obj))


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="API port")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run the API server in the foreground until interrupted."""
    import logging

    import uvicorn

    from thinkforge.platform.app import create_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = _settings(data_dir, **overrides)
    console.print(
        f"thinkforge API on http://{settings.host}:{settings.port} (data in {settings.data_dir})"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Apply all migrations to the configured database."""
    from thinkforge.platform.migrations import current, upgrade

    settings = _settings(data_dir)
    upgrade(settings.database_url)
    console.print(f"database at revision {current(settings.database_url)}")


@keys_app.command("create")
def keys_create(
    project: Annotated[
        str, typer.Option(help="project the key belongs to (created if new)")
    ] = "default",
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
    role: Annotated[
        str, typer.Option(help="admin, member, or inference (the Serve front door only)")
    ] = "member",
    admin: Annotated[bool, typer.Option(help="same as --role admin")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create an API key; the key is printed alone on the last line."""
    from thinkforge.platform.auth import ROLES

    role = "admin" if admin else role
    if role not in ROLES:
        raise typer.BadParameter(f"one of {', '.join(ROLES)}", param_hint="--role")
    from thinkforge.platform.auth import create_key
    from thinkforge.platform.db import make_engine, make_sessionmaker
    from thinkforge.platform.migrations import upgrade

    settings = _settings(data_dir)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            key = create_key(
                session,
                settings.secret_key.get_secret_value(),
                project_id=project,
                name=name,
                role=role,
            )
    finally:
        engine.dispose()
    err_console.print(f"created a {role} key for project {project!r}; it is shown once:")
    print(key)


@keys_app.command("list")
def keys_list(api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """The project's keys (an admin key): id, name, prefix, role, created, revoked."""
    with Client(api_url, api_key) as tf:
        keys = tf.list_keys()["data"]
    table = Table("id", "name", "prefix", "role", "created", "revoked")
    for k in keys:
        revoked = _when(k["revoked_at"]) if k["revoked_at"] else ""
        table.add_row(k["id"], k["name"], k["prefix"], k["role"], _when(k["created_at"]), revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (key-…)")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Revoke a key of the project (an admin key); the front door drops it within THINKFORGE_FRONTDOOR_REFRESH_S (10 s)."""
    with Client(api_url, api_key) as tf:
        _print(tf.revoke_key(key_id))


@app.command()
def usage(
    start: Annotated[int | None, typer.Option(help="unix seconds (default: 30 days ago)")] = None,
    end: Annotated[int | None, typer.Option(help="unix seconds (default: now)")] = None,
    group_by: Annotated[str, typer.Option(help="deployment, key or day")] = "deployment",
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Requests and tokens the front door answered for the project."""
    with Client(api_url, api_key) as tf:
        report = tf.usage(start=start, end=end, group_by=group_by)
    table = Table(group_by, "requests", "prompt", "completion", "reasoning", "total")
    for b in report["data"]:
        table.add_row(
            b["group"], str(b["requests"]), str(b["prompt_tokens"]),
            str(b["completion_tokens"]), str(b["reasoning_tokens"]), str(b["total_tokens"]),
        )  # fmt: skip
    console.print(table)


def _when(ts: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


@files_app.command("upload")
def files_upload(
    path: Path, purpose: str = "fine-tune", api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Upload a JSONL training file."""
    with Client(api_url, api_key) as tf:
        _print(tf.upload_file(path, purpose))


@files_app.command("list")
def files_list(api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    with Client(api_url, api_key) as tf:
        _print(tf.list_files(limit=100))


def job_request(recipe: Path | None, overrides: list[str], **fields: Any) -> dict[str, Any]:
    """Turn a recipe file plus ``key=value`` overrides into a POST /v1/fine_tuning/jobs body."""
    from thinkforge.jobs.config import apply_overrides

    data: dict[str, Any] = yaml.safe_load(recipe.read_text()) if recipe else {}
    data = apply_overrides(data or {}, overrides)
    for key, value in fields.items():
        if value is not None:
            data[key] = value
    body: dict[str, Any] = {
        "model": data.pop("model", None),
        "training_file": data.pop("dataset", None),
    }
    if "hyperparameters" in data:
        body["method"] = {
            "type": "supervised",
            "supervised": {"hyperparameters": data.pop("hyperparameters")},
        }
    for key in ("resources", "seed", "metadata", "validation_file"):
        if key in data:
            body[key] = data.pop(key)
    if "registered_model_name" in data:
        body["suffix"] = data.pop("registered_model_name")
    data.pop("validation_dataset", None)
    if recipe is not None:
        body["recipe"] = recipe.stem
    if data:
        body["config"] = data
    return {k: v for k, v in body.items() if v is not None}


@jobs_app.command("create")
def jobs_create(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, key.path=value")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="a recipe YAML file")] = None,
    model: Annotated[str | None, typer.Option(help="base model")] = None,
    training_file: Annotated[
        str | None, typer.Option(help="file id, dataset path, or a local file to upload")
    ] = None,
    follow: Annotated[bool, typer.Option(help="follow the job's events until it ends")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tuning job from a recipe and/or options."""
    body = job_request(recipe, overrides or [], model=model, dataset=training_file)
    with Client(api_url, api_key) as tf:
        source = body.get("training_file")
        if isinstance(source, str) and not source.startswith("file-") and Path(source).is_file():
            body["training_file"] = tf.upload_file(source)["id"]
        job = tf.create_job(body)
        _print(job)
        if follow:
            _follow(tf, job["id"])


@jobs_app.command("list")
def jobs_list(limit: int = 20, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    with Client(api_url, api_key) as tf:
        table = Table("status", "model", "fine_tuned_model", "created_at")
        table.columns.insert(0, Column("id", no_wrap=True))
        for job in tf.list_jobs(limit=limit)["data"]:
            table.add_row(
                job["id"],
                job["status"],
                job["model"],
                job["fine_tuned_model"] or "",
                str(job["created_at"]),
            )
        console.print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    with Client(api_url, api_key) as tf:
        _print(tf.get_job(job_id))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    with Client(api_url, api_key) as tf:
        _print(tf.cancel_job(job_id))


@jobs_app.command("pause")
def jobs_pause(job_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Checkpoint a running job and stop it (status pausing, then paused)."""
    with Client(api_url, api_key) as tf:
        _print(tf.pause_job(job_id))


@jobs_app.command("resume")
def jobs_resume(job_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Continue a paused job from the checkpoint it paused at."""
    with Client(api_url, api_key) as tf:
        _print(tf.resume_job(job_id))


@jobs_app.command("events")
def jobs_events(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
    ] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    with Client(api_url, api_key) as tf:
        if follow:
            _follow(tf, job_id)
            return
        for event in reversed(tf.list_events(job_id, limit=100)["data"]):
            _print_event(event)


def _follow(tf: Client, job_id: str) -> None:
    for event in tf.follow_events(job_id):
        _print_event(event)
    job = tf.get_job(job_id)
    style = "green" if job["status"] == "succeeded" else "red"
    console.print(
        f"[{style}]{job_id} {job['status']}[/{style}] {job.get('fine_tuned_model') or ''}"
    )


def _print_event(event: dict[str, Any]) -> None:
    style = {"error": "red", "warn": "yellow"}.get(event["level"], "")
    text = f"{event['created_at']} {event['message']}"
    console.print(f"[{style}]{text}[/{style}]" if style else text, highlight=False)


@models_app.command("list")
def models_list(api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Registered models with their aliases and latest version."""
    with Client(api_url, api_key) as tf:
        table = Table("name", "latest", "aliases")
        for model in tf.list_registered_models()["data"]:
            aliases = ", ".join(f"{k}=v{v}" for k, v in sorted(model["aliases"].items()))
            table.add_row(model["name"], str(model["latest_version"] or ""), aliases)
        console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="name, or name/version")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A model's versions, or one version with its lineage, metrics and manifest."""
    name, _, version = ref.partition("/")
    with Client(api_url, api_key) as tf:
        if version:
            _print(tf.get_version(name, int(version)))
        else:
            _print(tf.list_versions(name, limit=100))


@models_app.command("promote")
def models_promote(
    name: str,
    version: int,
    alias: Annotated[str, typer.Option(help="the alias to move")] = "production",
    reason: Annotated[str | None, typer.Option(help="recorded in the audit log")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Point an alias at a version (after checking its files against the manifest)."""
    with Client(api_url, api_key) as tf:
        _print(tf.promote(name, alias, version, reason))


@models_app.command("rollback")
def models_rollback(
    name: str,
    alias: Annotated[str, typer.Option(help="the alias to move back")] = "production",
    reason: Annotated[str | None, typer.Option(help="recorded in the audit log")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Move an alias back to the version it held before its last move."""
    with Client(api_url, api_key) as tf:
        _print(tf.rollback(name, alias, reason))


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="deployment name: the `model` clients send")],
    model: Annotated[str, typer.Option(help="registered-name@alias or registered-name/version")],
    max_thinking: Annotated[int | None, typer.Option(help="default max thinking tokens")] = None,
    min_replicas: int = 1,
    max_replicas: int = 1,
    wait: Annotated[bool, typer.Option(help="wait until it serves")] = True,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Serve a registry version on Ray Serve (created, or updated when it exists)."""
    body: dict[str, Any] = {
        "name": name,
        "model": model,
        "autoscaling": {"min_replicas": min_replicas, "max_replicas": max_replicas},
    }
    if max_thinking is not None:
        body["default_thinking"] = {"max_tokens": max_thinking}
    with Client(api_url, api_key) as tf:
        try:
            dep = tf.create_deployment(body)
        except APIError as exc:
            if exc.status_code != 409:
                raise
            update = {k: v for k, v in body.items() if k != "name"}
            dep = tf.update_deployment(name, update)
        if wait:
            dep = tf.wait_for_deployment(name)
        _print(dep)


@app.command("eval")
def eval_(
    target: Annotated[
        str, typer.Argument(help="a deployment, or a registry version (NAME/N, NAME@ALIAS)")
    ],
    dataset: Annotated[str, typer.Option(help="file id, dataset path, or a local file to upload")],
    max_thinking: Annotated[
        str, typer.Option(help="comma-separated max thinking tokens; 'full' for no cap")
    ] = "0,4,16,full",
    waits: Annotated[str, typer.Option(help="comma-separated forced waits at full budget")] = "",
    limit: Annotated[int | None, typer.Option(help="first N questions only")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Sweep thinking budgets over a deployment or a registry version; prints accuracy per
    budget. A version is loaded by the evaluation job itself: no deployment needed."""
    budgets: list[dict[str, Any]] = [
        {} if b.strip() == "full" else {"max_tokens": int(b)} for b in max_thinking.split(",") if b
    ]
    budgets += [{"num_waits": int(w)} for w in waits.split(",") if w]
    with Client(api_url, api_key) as tf:
        if not dataset.startswith("file-") and Path(dataset).is_file():
            dataset = tf.upload_file(dataset)["id"]
        kind = "model" if "/" in target or "@" in target else "deployment"
        body = {kind: target, "dataset": dataset, "budgets": budgets, "limit": limit}
        ev = tf.create_eval({k: v for k, v in body.items() if v is not None})
        with console.status(f"evaluation {ev['id']}"):
            ev = tf.wait_for_eval(ev["id"])
        if ev["status"] != "succeeded":
            err_console.print(f"[red]evaluation {ev['status']}: {ev.get('error')}[/red]")
            raise SystemExit(1)
        table = Table("budget", "accuracy", "avg thinking tokens")
        for b in ev["budgets"]:
            table.add_row(b["budget"], f"{b['accuracy']:.1%}", f"{b['avg_thinking_tokens']:.1f}")
        console.print(table)
        console.print(
            f"plot: {tf.http.base_url}{ev['plot_url']}  mlflow run: {ev['mlflow_run_id']}"
        )


@app.command("distill")
def distill(
    questions: Annotated[
        str, typer.Argument(help="a question file id, or a local JSONL/parquet file to upload")
    ],
    teacher: Annotated[
        str,
        typer.Option(
            help="a deployment, a registry version (NAME/N, NAME@ALIAS) or an "
            "allowed OpenAI-compatible base URL (https://...)"
        ),
    ],
    teacher_model: Annotated[str | None, typer.Option(help="an external teacher's model")] = None,
    api_key_secret: Annotated[
        str | None, typer.Option(help="the name of an external teacher's key in the settings")
    ] = None,
    samples: Annotated[int, typer.Option(help="traces per question")] = 1,
    max_thinking: Annotated[int | None, typer.Option(help="thinking budget (tokens)")] = None,
    temperature: float = 0.7,
    seed: int = 0,
    min_correct: Annotated[int, typer.Option(help="right samples a question needs")] = 1,
    weaker: Annotated[
        str | None, typer.Option(help="drop questions this deployment or version answers right")
    ] = None,
    category_field: Annotated[str | None, typer.Option(help="diversity: sample across it")] = None,
    max_examples: Annotated[int | None, typer.Option(help="keep at most this many")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Distil a teacher's verified, curated traces for a question pool into a training
    file; prints the counts per curation stage and the file id to fine-tune on."""

    def platform_model(ref: str) -> dict[str, str]:
        return {"version": ref} if "/" in ref or "@" in ref else {"deployment": ref}

    with Client(api_url, api_key) as tf:
        if not questions.startswith("file-") and Path(questions).is_file():
            questions = tf.upload_file(questions, purpose="distill")["id"]
        who: dict[str, Any] = platform_model(teacher)
        if teacher.startswith(("http://", "https://")):
            who = {"base_url": teacher, "model": teacher_model, "api_key_secret": api_key_secret}
        curation = {"min_correct": min_correct, "category_field": category_field,
                    "max_examples": max_examples,
                    "weaker": platform_model(weaker) if weaker else None}  # fmt: skip
        body = {
            "question_file": questions, "samples": samples, "temperature": temperature,
            "seed": seed, "teacher": {k: v for k, v in who.items() if v is not None},
            "thinking": {"max_tokens": max_thinking} if max_thinking is not None else None,
            "curation": {k: v for k, v in curation.items() if v is not None},
        }  # fmt: skip
        made = tf.distill({k: v for k, v in body.items() if v is not None})
        with console.status(f"distillation {made['id']}"):
            done = tf.wait_for_distillation(made["id"])
        table = Table("stage", "questions kept")
        for stage, counts in (done.get("stages") or {}).items():
            if isinstance(counts, dict) and "questions_kept" in counts:
                table.add_row(stage, str(counts["questions_kept"]))
        console.print(table)
        if done["status"] != "succeeded":
            err_console.print(f"[red]distillation {done['status']}: {done.get('error')}; "
                              f"traces: {done.get('traces_file')}[/red]")  # fmt: skip
            raise SystemExit(1)
        console.print(f"training file: {done['output_file']}  counts: {done['counts']}")


@app.command()
def chat(
    deployment: str,
    message: Annotated[str, typer.Argument(help="what to ask")],
    max_thinking: Annotated[int | None, typer.Option(help="max thinking tokens")] = None,
    min_thinking: Annotated[int | None, typer.Option(help="min thinking tokens")] = None,
    waits: Annotated[int, typer.Option(help="times to ignore end-of-thinking ('Wait')")] = 0,
    serve_url: Annotated[
        str, typer.Option(envvar="THINKFORGE_SERVE_URL", help="the OpenAI-compatible front door")
    ] = "http://127.0.0.1:8100/v1",
    api_key: ApiKey = None,
) -> None:
    """Ask a deployment; thinking streams dim, the answer in plain text."""
    from openai import OpenAI

    thinking: dict[str, Any] = {"num_waits": waits}
    if max_thinking is not None:
        thinking["max_tokens"] = max_thinking
    if min_thinking is not None:
        thinking["min_tokens"] = min_thinking
    import os

    key = api_key or os.environ.get("THINKFORGE_BOOTSTRAP_API_KEY")
    if not key:
        raise typer.BadParameter("the front door needs a key", param_hint="--api-key")
    client = OpenAI(base_url=serve_url, api_key=key)
    stream = client.chat.completions.create(
        model=deployment,
        messages=[{"role": "user", "content": message}],
        stream=True,
        extra_body={"thinking": thinking},
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        if reasoning:
            console.print(reasoning, style="dim italic", end="", highlight=False)
        if delta.content:
            console.print(delta.content, style="bold", end="", highlight=False)
    console.print()


if __name__ == "__main__":
    main()
