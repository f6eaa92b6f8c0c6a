"""A real HTTP receiver on loopback standing in for the company's application: it checks each
call's signature with the verifier the README shows, answers as the test says, and counts the
calls it answered with success per Idempotency-Key."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_verifier() -> Callable[..., bool]:
    """The ``verify`` function of the README's webhook section, exactly as printed there."""
    text = README.read_text()
    match = re.search(r"<!-- webhook-verifier -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "the README's webhook verifier is missing"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    genuine: bool
    status: int

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.verify = readme_verifier()
        self.calls: list[Call] = []
        # Idempotency-Key -> calls answered with success; a key seen again is answered with
        # success and not reset again, as the README asks of applications.
        self.successes: dict[str, int] = {}
        # What to answer: a status per call, in order; after the list, ``then``.
        self.script: list[int | str] = []
        self.then: int = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.handle(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/internal/reset"

    def handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = dict(handler.headers.items())
        genuine = self.verify(self.secret, handler.headers, body)
        with self._lock:
            answer = self.script.pop(0) if self.script else self.then
        if answer == "hang":  # slower than mailproc's timeout
            time.sleep(1.5)
            answer = 200
        status = int(answer) if genuine else 401
        if genuine and 200 <= status < 300:
            key = handler.headers["Idempotency-Key"]
            with self._lock:
                self.successes[key] = self.successes.get(key, 0) + 1
        with self._lock:
            self.calls.append(Call(headers, body, genuine, status))
        reply = b'{"ok": true}' if status < 300 else b'{"error": "try later"}'
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
