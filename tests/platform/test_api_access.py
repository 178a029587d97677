"""Who may call what: the key is checked before a body is read, and every operation in
/openapi.json answers 401 without a key, 403 to a member on admin-only actions and 404 to
another project on this project's objects. Real HTTP over a live server."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

from tests.conftest import LiveServer
from tests.platform.conftest import make_settings
from tests.platform.fakes import FakeLauncher, FakeServe
from thinkforge.platform.app import create_app

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
