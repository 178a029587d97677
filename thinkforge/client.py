"""A small typed Python client of the thinkforge REST API (what the CLI uses).

with Client("http://127.0.0.1:8000", api_key="tf-…") as tf:
    f = tf.upload_file("train.jsonl")
    job = tf.create_job({"model": "thinkforge/tiny", "training_file": f["id"]})
    tf.wait_for_job(job["id"])
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8000"


class APIError(Exception):
    """The API answered an error; ``error`` is its ``{"message", "type", "param", "code"}``."""

    def __init__(self, status_code: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status_code} {error.get('type')}: {error.get('message')}")
        self.status_code = status_code
        self.error = error


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60
    ) -> None:
        base_url = base_url or os.environ.get("THINKFORGE_API_URL", DEFAULT_URL)
        api_key = (
            api_key
            or os.environ.get("THINKFORGE_API_KEY")
            or os.environ.get("THINKFORGE_BOOTSTRAP_API_KEY")
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if method == "POST":
            headers = kwargs.pop("headers", {})
            headers.setdefault("Idempotency-Key", str(uuid.uuid4()))
            kwargs["headers"] = headers
        resp = self.http.request(method, path, **kwargs)
        _raise_for_error(resp)
        return resp.json()

    # ---- files
    def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as fh:
            return self.request(  # type: ignore[no-any-return]
                "POST", "/v1/files", files={"file": (path.name, fh)}, data={"purpose": purpose}
            )

    def list_files(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/files", params=params)  # type: ignore[no-any-return]

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/files/{file_id}")  # type: ignore[no-any-return]

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/files/{file_id}")  # type: ignore[no-any-return]

    # ---- jobs
    def create_job(
        self, body: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}")  # type: ignore[no-any-return]

    def list_jobs(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/fine_tuning/jobs", params=params)  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")  # type: ignore[no-any-return]

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")  # type: ignore[no-any-return]

    def list_events(self, job_id: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)  # type: ignore[no-any-return]

    def list_checkpoints(self, job_id: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params=params)  # type: ignore[no-any-return]

    # ---- registry
    def list_registered_models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/registry/models", params={"limit": 100})  # type: ignore[no-any-return]

    def get_registered_model(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/registry/models/{name}")  # type: ignore[no-any-return]

    def list_versions(self, name: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", f"/v1/registry/models/{name}/versions", params=params)  # type: ignore[no-any-return]

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/registry/models/{name}/versions/{version}")  # type: ignore[no-any-return]

    def promote(
        self, name: str, alias: str, version: int, reason: str | None = None
    ) -> dict[str, Any]:
        body = {"version": version, "reason": reason}
        return self.request("PUT", f"/v1/registry/models/{name}/aliases/{alias}", json=body)  # type: ignore[no-any-return]

    def rollback(self, name: str, alias: str, reason: str | None = None) -> dict[str, Any]:
        path = f"/v1/registry/models/{name}/aliases/{alias}/rollback"
        return self.request("POST", path, json={"reason": reason})  # type: ignore[no-any-return]

    def delete_alias(self, name: str, alias: str) -> dict[str, Any]:
        path = f"/v1/registry/models/{name}/aliases/{alias}"
        return self.request("DELETE", path)  # type: ignore[no-any-return]

    def list_audit(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/audit", params=params)  # type: ignore[no-any-return]

    # ---- keys, quotas, usage
    def list_keys(self) -> dict[str, Any]:
        return self.request("GET", "/v1/keys")  # type: ignore[no-any-return]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/keys/{key_id}/revoke")  # type: ignore[no-any-return]

    def get_quota(self) -> dict[str, Any]:
        return self.request("GET", "/v1/quotas")  # type: ignore[no-any-return]

    def set_quota(self, **limits: int) -> dict[str, Any]:
        return self.request("PATCH", "/v1/quotas", json=limits)  # type: ignore[no-any-return]

    def usage(self, **params: Any) -> dict[str, Any]:
        """``start``/``end`` in unix seconds, ``group_by`` deployment, key or day."""
        params = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", "/v1/usage", params=params)  # type: ignore[no-any-return]

    # ---- deployments
    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/deployments", json=body)  # type: ignore[no-any-return]

    def update_deployment(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/v1/deployments/{name}", json=body)  # type: ignore[no-any-return]

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/deployments/{name}")  # type: ignore[no-any-return]

    def list_deployments(self) -> dict[str, Any]:
        return self.request("GET", "/v1/deployments")  # type: ignore[no-any-return]

    def delete_deployment(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/deployments/{name}")  # type: ignore[no-any-return]

    def create_eval(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/evals", json=body)  # type: ignore[no-any-return]

    def get_eval(self, eval_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/evals/{eval_id}")  # type: ignore[no-any-return]

    def cancel_eval(self, eval_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/evals/{eval_id}/cancel")  # type: ignore[no-any-return]

    def list_evals(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/evals", params=params)  # type: ignore[no-any-return]

    def eval_plot(self, eval_id: str) -> bytes:
        """The scaling plot (PNG) of a succeeded evaluation."""
        resp = self.http.get(f"/v1/evals/{eval_id}/plot.png")
        _raise_for_error(resp)
        return resp.content

    def wait_for_eval(
        self, eval_id: str, timeout_s: float = 3600, poll_s: float = 2.0
    ) -> dict[str, Any]:
        return _wait_until_ended("evaluation", self.get_eval, eval_id, timeout_s, poll_s)

    def distill(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/datasets/distill``: teacher traces for a question file (uploaded with
        ``purpose="distill"``), verified and curated into a training file."""
        return self.request("POST", "/v1/datasets/distill", json=body)  # type: ignore[no-any-return]

    def get_distillation(self, distill_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/datasets/distill/{distill_id}")  # type: ignore[no-any-return]

    def list_distillations(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/datasets/distill", params=params)  # type: ignore[no-any-return]

    def cancel_distillation(self, distill_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/datasets/distill/{distill_id}/cancel")  # type: ignore[no-any-return]

    def distillation_events(self, distill_id: str, **params: Any) -> dict[str, Any]:
        return self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/datasets/distill/{distill_id}/events", params=params
        )

    def wait_for_distillation(
        self, distill_id: str, timeout_s: float = 3600, poll_s: float = 2.0
    ) -> dict[str, Any]:
        return _wait_until_ended(
            "distillation", self.get_distillation, distill_id, timeout_s, poll_s
        )

    def wait_for_deployment(self, name: str, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            dep = self.get_deployment(name)
            if dep["status"] == "running":
                return dep
            if dep["status"] == "failed" or time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name} is {dep['status']}: {dep.get('message')}")
            time.sleep(1)

    def follow_events(self, job_id: str, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
        """Yield the job's events oldest first, as they come, until the job ends."""
        seen: set[str] = set()
        while True:
            job = self.get_job(job_id)
            fresh = [e for e in self.list_events(job_id, limit=100)["data"] if e["id"] not in seen]
            for event in reversed(fresh):
                seen.add(event["id"])
                yield event
            if job["status"] in TERMINAL:
                return
            time.sleep(poll_s)

    def wait_for_job(
        self, job_id: str, timeout_s: float = 3600, poll_s: float = 1.0
    ) -> dict[str, Any]:
        return _wait_until_ended("job", self.get_job, job_id, timeout_s, poll_s)


def _raise_for_error(resp: httpx.Response) -> None:
    """The API's error object as an APIError (any error body if it is not the API's)."""
    if resp.status_code < 400:
        return
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"message": resp.text, "type": "http_error", "param": None, "code": None}
    raise APIError(resp.status_code, error)


def _wait_until_ended(
    kind: str,
    get: Callable[[str], dict[str, Any]],
    object_id: str,
    timeout_s: float,
    poll_s: float,
) -> dict[str, Any]:
    """Poll a job or an evaluation until its status is terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = get(object_id)
        if found["status"] in TERMINAL:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} {object_id} still {found['status']} after {timeout_s}s")
        time.sleep(poll_s)
