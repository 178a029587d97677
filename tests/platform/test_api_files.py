"""Files API over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer
from tests.platform.conftest import BOOTSTRAP_KEY, Api, make_settings
from tests.platform.data import CHAT, LIMO, S1K, jsonl
from tests.platform.fakes import FakeLauncher
from thinkforge.platform.app import create_app


def upload(api: Api, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune", **kw):  # type: ignore[no-untyped-def]
    return api.client.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}, **kw
    )


def assert_error(resp, status: int, param: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def stored_files(api: Api) -> list[Path]:
    return [p for p in api.settings.files_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize(("row", "fmt"), [(S1K, "s1k"), (LIMO, "limo"), (CHAT, "chat")])
def test_upload_each_format(api: Api, row: dict, fmt: str) -> None:
    resp = upload(api, jsonl(row, row, row))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "file" and body["format"] == fmt and body["num_records"] == 3
    assert body["id"].startswith("file-")
    assert api.client.get(f"/v1/files/{body['id']}").json() == body
    listed = api.client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [body["id"]]
    deleted = api.client.delete(f"/v1/files/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert_error(api.client.get(f"/v1/files/{body['id']}"), 404)
    assert stored_files(api) == []


@pytest.mark.parametrize(
    ("content", "needle", "param"),
    [
        (b"", "no records", "file"),
        (b"\n\n", "no records", "file"),
        (b"{not json\n", "line 1: not valid JSON", "file"),
        (jsonl(S1K) + b"[1, 2]\n", "line 2", "file"),
        (jsonl(LIMO, {"question": "q", "solution": "s"}), "line 2: field 'answer'", "answer"),
        (
            jsonl({"question": "q", "thinking_trajectories": [], "attempt": "a"}),
            "line 1",
            "thinking_trajectories",
        ),
        (jsonl({"messages": [{"role": "user", "content": "hi"}]}), "line 1", "messages[0].role"),
        (jsonl(S1K, LIMO), "line 2", "thinking_trajectories"),
        (b"\xff\xfe\n", "line 1: not UTF-8", "file"),
    ],
)
def test_bad_uploads_are_rejected_and_write_nothing(
    api: Api, content: bytes, needle: str, param: str
) -> None:
    err = assert_error(upload(api, content), 400, param)
    assert needle in err["message"]
    assert err["code"] == "invalid_file"
    assert api.client.get("/v1/files").json()["data"] == []
    assert stored_files(api) == []


def test_upload_rules(api: Api) -> None:
    assert_error(upload(api, jsonl(S1K), purpose="batch"), 400, "purpose")
    assert_error(upload(api, jsonl(S1K), name="train.csv"), 400, "file")
    assert api.client.get("/v1/files").json()["data"] == []


def test_body_limits_answer_413_and_write_nothing(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, max_upload_bytes=4096, max_request_bytes=2048)
    app = create_app(settings, launcher=FakeLauncher())
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, headers=headers) as client:
        big = jsonl(*[S1K] * 100)
        assert 4096 < len(big) * 2 < 4096 + 64 * 1024
        huge = big * 100  # well past the upload limit and its multipart allowance
        resp = client.post(
            "/v1/files", files={"file": ("t.jsonl", huge)}, data={"purpose": "fine-tune"}
        )
        assert_error(resp, 413)
        # Past the file limit but under the multipart allowance: caught while copying.
        resp = client.post(
            "/v1/files", files={"file": ("t.jsonl", big * 2)}, data={"purpose": "fine-tune"}
        )
        assert_error(resp, 413)

        def chunks():  # type: ignore[no-untyped-def]
            yield b'{"model": "m", "training_file": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        resp = client.post(
            "/v1/fine_tuning/jobs", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_error(resp, 413)
        assert client.get("/v1/files").json()["data"] == []
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert [p for p in settings.files_dir.rglob("*") if p.is_file()] == []


def test_files_are_scoped_to_a_project(api: Api) -> None:
    from thinkforge.platform.auth import create_key

    file_id = upload(api, jsonl(S1K)).json()["id"]
    with api.app.state.ctx.sessions.begin() as session:  # type: ignore[attr-defined]
        other = create_key(session, api.settings.secret_key.get_secret_value(), project_id="other")
    with api.keyed(other) as client:
        assert_error(client.get(f"/v1/files/{file_id}"), 404)
        assert client.get("/v1/files").json()["data"] == []
        assert_error(client.delete(f"/v1/files/{file_id}"), 404)
    assert api.client.get(f"/v1/files/{file_id}").status_code == 200
