"""Who may call what: the key is checked before a body is read, and every operation in
/openapi.json answers 401 without a key, 403 to a member on admin-only actions and 404 to
another project on this project's objects. Real HTTP over a live server."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.platform.conftest import BOOTSTRAP_KEY, make_settings
from tests.platform.data import S1K, jsonl
from tests.platform.fakes import FakeLauncher, FakeServe
from tests.platform.test_api_files import assert_error
from tests.platform.test_registry_mlflow import register_job
from thinkforge.platform.app import create_app
from thinkforge.platform.auth import ADMIN_ONLY, create_key, create_key_row

MiB = 1 << 20


class BodyMeter:
    """Wraps an ASGI app and counts the request body bytes the app pulled in."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def slow_upload(
    port: int, *, size: int, chunk: int, pause_s: float, give_up: int
) -> tuple[int, int]:
    """POST a multipart body of ``size`` bytes to /v1/files with no key, ``chunk`` bytes
    every ``pause_s``, until the server answers; returns (status, bytes sent). Stops with
    status 0 once ``give_up`` bytes went out unanswered."""
    boundary = "tf-slow-boundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        body = part + b"x" * (chunk - len(part))
        while sent < give_up:
            answered, _, _ = select.select([sock], [], [], pause_s)
            if answered:
                break
            sock.sendall(body)
            sent += len(body)
            body = b"x" * chunk
        else:
            return 0, sent
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), sent


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(
    tmp_path: Path, database_url: str
) -> None:
    """A 100 MB multipart body, streamed slowly with no key: 401 with (almost) none read."""
    settings = make_settings(tmp_path, database_url)
    meter = BodyMeter(create_app(settings, launcher=FakeLauncher(), serve=FakeServe()))
    with LiveServer(meter) as server:
        started = time.monotonic()
        status, sent = slow_upload(
            server.port, size=100 * 1000 * 1000, chunk=4096, pause_s=0.01, give_up=2 * MiB
        )
        elapsed = time.monotonic() - started
    print(
        f"answered {status} after the client sent {sent} B; the app read {meter.read} B, {elapsed:.2f} s"
    )
    assert status == 401, f"no 401 after {sent} bytes (status {status})"
    assert meter.read <= 4096, f"the app read {meter.read} bytes of an unauthenticated body"


# ---------------------------------------------------------------- every operation

OWNED = "a-owned-sft"
PUBLIC = {"/healthz", "/readyz"}


@dataclass
class ProjectA:
    """A live API whose default project owns one object of every kind."""

    url: str
    http: httpx.Client  # no key of its own
    file: str
    job: str
    eval: str
    deployment: str
    member: str  # a member key of project A
    outsider: str  # an admin key of project "b"
    member_id: str  # the member key's id
    questions: str  # a purpose=distill question file
    distill: str

    def fill(self, path: str) -> str:
        """``path`` with project A's objects; a new path parameter fails here until added."""
        deployment_route = path.startswith("/v1/deployments")
        values = {
            "file_id": self.file, "job_id": self.job, "eval_id": self.eval, "version": "1",
            "alias": "production", "name": self.deployment if deployment_route else OWNED,
            "key_id": self.member_id, "distill_id": self.distill,
        }  # fmt: skip
        return path.format(**values)

    def body(self, method: str, path: str) -> dict | None:
        """A valid body for each operation that takes one, naming project A's objects."""
        bodies = {
            ("POST", "/v1/fine_tuning/jobs"): {"model": "thinkforge/tiny", "training_file": self.file},
            ("PUT", "/v1/registry/models/{name}/aliases/{alias}"): {"version": 1},
            ("POST", "/v1/deployments"): {"name": "b-deploy", "model": f"{OWNED}@production"},
            ("PATCH", "/v1/deployments/{name}"): {"model": f"{OWNED}/1"},
            ("POST", "/v1/evals"): {"deployment": self.deployment, "dataset": self.file, "budgets": [{}]},
            ("POST", "/v1/datasets/distill"): {"question_file": self.questions, "teacher": {"deployment": self.deployment}},
        }  # fmt: skip
        return bodies.get((method, path))


def operations(url: str) -> list[tuple[str, str]]:
    schema = httpx.get(f"{url}/openapi.json").json()
    ops = [(m.upper(), p) for p, item in schema["paths"].items() for m in item]
    assert {p for _, p in ops if not p.startswith("/v1/")} == PUBLIC
    return [(m, p) for m, p in ops if p.startswith("/v1/")]


def call(a: ProjectA, key: str | None, method: str, path: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if path == "/v1/files" and method == "POST":
        files = {"file": ("t.jsonl", jsonl(S1K))}
        return a.http.post(path, files=files, data={"purpose": "fine-tune"}, headers=headers)
    return a.http.request(method, a.fill(path), json=a.body(method, path), headers=headers)


def snapshot(a: ProjectA) -> dict[str, Any]:
    """Project A's objects as its admin sees them: a rejected request changes none."""
    admin = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    paths = [
        "/v1/files", "/v1/fine_tuning/jobs", "/v1/evals", "/v1/deployments", "/v1/audit",
        "/v1/keys", "/v1/quotas", "/v1/datasets/distill",
        f"/v1/registry/models/{OWNED}", f"/v1/registry/models/{OWNED}/versions",
    ]  # fmt: skip
    return {p: a.http.get(p, headers=admin).json() for p in paths}


@pytest.fixture(scope="module")
def project_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProjectA]:
    tmp = tmp_path_factory.mktemp("access")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'thinkforge.db'}")
    app = create_app(settings, launcher=FakeLauncher(), serve=FakeServe())
    sessions = app.state.ctx.sessions
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"}, timeout=30
        ) as client,
    ):
        file_id = client.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(S1K, S1K))}, data={"purpose": "fine-tune"}
        ).json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "thinkforge/tiny", "training_file": file_id, "suffix": OWNED},
        ).json()["id"]
        uri, root = settings.mlflow_tracking_uri, settings.mlflow_artifact_root
        register_job(uri, tmp, job, artifact_root=root, name=OWNED)
        aliases = f"/v1/registry/models/{OWNED}/aliases"
        for version in (1, 1):  # twice: the rollback has a step to take
            assert client.put(f"{aliases}/production", json={"version": version}).status_code == 200
        deployed = client.post("/v1/deployments", json={"name": "a-deploy", "model": f"{OWNED}/1"})
        assert deployed.status_code == 200, deployed.text
        ev = client.post(
            "/v1/evals", json={"deployment": "a-deploy", "dataset": file_id, "budgets": [{}]}
        )
        assert ev.status_code == 200, ev.text
        questions = client.post(
            "/v1/files",
            files={"file": ("q.jsonl", jsonl({"question": "Sum: 1 2", "answer": "3"}))},
            data={"purpose": "distill"},
        ).json()["id"]
        distill = client.post(
            "/v1/datasets/distill",
            json={"question_file": questions, "teacher": {"deployment": "a-deploy"}},
        )
        assert distill.status_code == 200, distill.text
        secret = settings.secret_key.get_secret_value()
        with sessions.begin() as session:
            row, member = create_key_row(session, secret, project_id="default", role="member")
            member_id = row.id
            outsider = create_key(session, secret, project_id="b", role="admin")
        yield ProjectA(
            server.url, http, file_id, job, ev.json()["id"], "a-deploy", member, outsider,
            member_id, questions, distill.json()["id"],
        )  # fmt: skip


def test_every_operation_needs_a_key(project_a: ProjectA) -> None:
    before = snapshot(project_a)
    for method, path in operations(project_a.url):
        for key in (None, "tf-not-a-key"):
            resp = call(project_a, key, method, path)
            assert_error(resp, 401)
            assert resp.json()["error"]["type"] == "authentication_error", (method, path)
    assert snapshot(project_a) == before


def test_another_project_finds_none_of_this_projects_objects(project_a: ProjectA) -> None:
    before = snapshot(project_a)
    mine = [project_a.file, project_a.job, project_a.eval, project_a.deployment, OWNED,
            project_a.questions, project_a.distill]  # fmt: skip
    for method, path in operations(project_a.url):
        resp = call(project_a, project_a.outsider, method, path)
        if "{" in path:  # an object of project A by id or name: as if it did not exist
            assert resp.status_code == 404, (method, path, resp.text)
            assert_error(resp, 404)
        elif method == "GET":  # a list: none of A's objects in it
            assert resp.status_code == 200, (method, path, resp.text)
            assert not [m for m in mine if m in resp.text], (method, path, resp.text)
        elif path != "/v1/files":  # a create naming A's objects: refused
            assert resp.status_code in (400, 404), (method, path, resp.text)
            assert_error(resp, resp.status_code)
    assert snapshot(project_a) == before


def test_a_member_key_gets_403_on_each_admin_only_action(project_a: ProjectA) -> None:
    ops = operations(project_a.url)
    assert set(ADMIN_ONLY) <= set(ops), "ADMIN_ONLY names an operation that does not exist"
    aliases = "/v1/registry/models/{name}/aliases/{alias}"
    assert {("PUT", aliases), ("DELETE", aliases), ("POST", f"{aliases}/rollback")} <= ADMIN_ONLY
    before = snapshot(project_a)
    for method, path in ops:
        if (method, path) in ADMIN_ONLY:
            resp = call(project_a, project_a.member, method, path)
            assert assert_error(resp, 403)["code"] == "admin_required", (method, path)
        elif method == "GET":  # reads are open to members (writes would change A's objects)
            resp = call(project_a, project_a.member, method, path)
            assert resp.status_code != 403 and resp.status_code < 500, (method, path, resp.text)
    assert snapshot(project_a) == before
