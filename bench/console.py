"""Console pages with a large queue: the queue page, a search, and a request's page, served by
``mailproc serve`` with 100,000 requests stored, beside the console's static stylesheet served
by the same server in the same run (the baseline: the cost of the HTTP stack alone).

The database is filled directly (10 % of the requests open, the rest decided; every request
with its message, verdict, rule trace and audit events), an agent signs in with password and
TOTP like a person, then ``--clients`` concurrent clients fetch each page for ``--duration``
seconds. Prints a table and writes bench/console.json: pages per second, p50/p95 latency, and
each page's rate as a fraction of the baseline's."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp
from sqlalchemy import insert, select

from mailproc import db
from mailproc.agents import AgentService
from mailproc.models import Agent, AgentRole, Message, MessageState, RequestState, ResetRequest
from mailproc.requests import audit
from tests.dkimkeys import build_message

RESULTS = Path(__file__).resolve().parent / "console.json"
PASSWORD = "bench password 1234"
CLOSED = [RequestState.COMPLETED, RequestState.DENIED, RequestState.EXPIRED]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fill(database: db.Database, total: int) -> list[int]:
    """Store ``total`` requests (one in ten open); returns the ids of some open ones."""
    raw = build_message(from_header="Alice <alice@example.org>")
    now = datetime.now(UTC)
    verdict = {
        "authenticated": True,
        "strength": "strong",
        "from": "alice@example.org",
        "from_domain": "example.org",
        "alignment": "strict",
        "dkim": [
            {
                "domain": "example.org",
                "selector": "s2048",
                "algorithm": "rsa-sha256",
                "key_bits": 2048,
                "result": "pass",
                "aligned": True,
                "counts": True,
                "reasons": [],
            }
        ],
        "spf": None,
        "upstream": [],
        "arc": None,
        "reasons": [],
    }
    decision = {
        "rule": "reset-security-question",
        "action": "queue_reset",
        "trace": [
            {
                "rule": "reset-security-question",
                "matched": True,
                "conditions": ['subject is "Reset my security question"', "min_strength strong"],
            }
        ],
    }
    batch = 5000
    open_ids: list[int] = []
    with database.writing_connection() as connection:
        for start in range(0, total, batch):
            count = min(batch, total - start)
            message_ids = connection.execute(
                insert(Message).returning(Message.id, sort_by_parameter_order=True),
                [
                    {
                        "state": MessageState.PROCESSED,
                        "received_at": now,
                        "updated_at": now,
                        "protocol": "smtp",
                        "peer_ip": "127.0.0.1",
                        "mail_from": "alice@example.org",
                        "rcpt_tos": ["support@example.com"],
                        "size": len(raw),
                        "sha256": "0" * 64,
                        "raw": raw,
                        "intake_flags": [],
                        "attempts": 1,
                    }
                    for _ in range(count)
                ],
            ).scalars()
            rows = []
            for offset, message_id in enumerate(message_ids):
                n = start + offset
                state = RequestState.PENDING if n % 10 == 0 else CLOSED[n % 3]
                created = now - timedelta(minutes=total - n)
                rows.append(
                    {
                        "reference": f"R-B{n:08d}",
                        "state": state,
                        "account_id": str(100_000 + n),
                        "email": f"owner{n}@example.org",
                        "account_name": f"Owner {n}",
                        "locale": "en",
                        "message_id": message_id,
                        "auth_strength": "strong",
                        "verdict": verdict,
                        "decision": decision,
                        "risk_flags": ["first_contact"] if n % 7 == 0 else [],
                        "created_at": created,
                        "updated_at": created,
                        "expires_at": now + timedelta(days=7),
                    }
                )
            ids = connection.execute(
                insert(ResetRequest).returning(ResetRequest.id, sort_by_parameter_order=True),
                rows,
            ).scalars()
            for row, request_id in zip(rows, ids, strict=True):
                if row["state"] == RequestState.PENDING and len(open_ids) < 200:
                    open_ids.append(request_id)
        for request_id in open_ids:
            for action in ("created", "message_decided"):
                audit(connection, request_id, action=action, at=now, reason="bench")
    return open_ids


def sign_in(base: str) -> dict[str, str]:
    with httpx.Client(base_url=base, follow_redirects=True) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        client.post("/login", data={"csrf": csrf.group(1), "name": "bench", "password": PASSWORD})
        enrol = client.get("/login/enrol")
        secret = re.search(r"Key: <code>([A-Z2-7 ]+)</code>", enrol.text)
        form = re.search(r'name="csrf" value="([^"]+)"', enrol.text)
        assert secret, enrol.text[:500]
        assert form, enrol.text[:500]
        code = pyotp.TOTP(secret.group(1).replace(" ", "")).now()
        done = client.post("/login/enrol", data={"csrf": form.group(1), "code": code})
        assert done.status_code == 200, done.text[:300]
        assert "Open requests" in done.text, done.text[:300]
        return dict(client.cookies.items())


async def measure(
    base: str, cookies: dict[str, str], paths: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0

    async def one(number: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, cookies=cookies) as client:
            index = number
            while time.perf_counter() < end:
                started = time.perf_counter()
                answer = await client.get(paths[index % len(paths)])
                if answer.status_code != 200:
                    errors += 1
                latencies.append(time.perf_counter() - started)
                index += clients

    warm = time.perf_counter() + 1.0
    end = warm
    await asyncio.gather(*(one(n) for n in range(clients)))  # warm-up
    latencies.clear()
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(*(one(n) for n in range(clients)))
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "pages_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 1),
        "requests": len(latencies),
        "errors": errors,
    }


QUEUE_TARGET_MS = 100.0


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Fill, serve, measure; prints the table and returns the results (also written)."""
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--output", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'mailproc.db'}"
        database = db.Database(url)
        db.upgrade(database)
        started = time.perf_counter()
        open_ids = fill(database, args.requests)
        AgentService(database).add("bench", PASSWORD, AgentRole.ADMIN)
        with database.reading() as session:
            assert session.scalars(select(Agent.id)).first() is not None
        database.dispose()
        print(f"stored {args.requests} requests in {time.perf_counter() - started:.1f} s")

        web_port, smtp_port = free_port(), free_port()
        config = Path(scratch) / "mailproc.toml"
        config.write_text(
            f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
            f'[database]\nurl = "{url}"\n'
            f'[web]\nlisten = "127.0.0.1:{web_port}"\nbase_url = "http://127.0.0.1:{web_port}"\n'
            "[worker]\nprocesses = 1\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROC_")}
        server = subprocess.Popen(
            [sys.executable, "-m", "mailproc", "--config", str(config), "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{web_port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(base + "/login", timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("mailproc serve did not start") from None
                    time.sleep(0.2)
            cookies = sign_in(base)
            pages = {
                "baseline: /static/console.css": ["/static/console.css"],
                "queue (open, oldest first)": ["/"],
                "queue, completed tab": ["/?state=completed"],
                "queue, search by address": [f"/?q=owner{n}@" for n in range(10, 2000, 37)],
                "request page": [f"/requests/{i}" for i in open_ids],
            }
            results: dict[str, Any] = {}
            single: dict[str, Any] = {}
            for name, paths in pages.items():
                # One agent alone first: the latency a person sees; then the busy console.
                single[name] = asyncio.run(
                    measure(base, cookies, paths, 1, max(args.duration / 2, 1.0))
                )
                results[name] = asyncio.run(
                    measure(base, cookies, paths, args.clients, args.duration)
                )
                print(f"  measured {name}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    baseline = results["baseline: /static/console.css"]["pages_per_second"]
    print(f"\n{args.requests} requests stored")
    print(f"{'page':<34} {'one agent: p50 ms':>18} {'p95 ms':>8}")
    for name, result in single.items():
        print(f"{name:<34} {result['p50_ms']:>18} {result['p95_ms']:>8}")
    print(f"\n{args.clients} clients at once, {args.duration:g} s each")
    print(f"{'page':<34} {'pages/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'vs baseline':>12}")
    for name, result in results.items():
        result["ratio_to_baseline"] = round(result["pages_per_second"] / baseline, 3)
        print(
            f"{name:<34} {result['pages_per_second']:>9} {result['p50_ms']:>8} "
            f"{result['p95_ms']:>8} {result['ratio_to_baseline']:>12}"
        )
    queue_ms = single["queue (open, oldest first)"]["p95_ms"]
    target = {
        "name": f"queue page < {QUEUE_TARGET_MS:g} ms at {args.requests:,} requests",
        "measured": f"p95 {queue_ms} ms for one agent",
        "value": queue_ms,
        "limit": QUEUE_TARGET_MS,
        "met": queue_ms < QUEUE_TARGET_MS,
    }
    print(
        f"\ntarget {target['name']}: {target['measured']}: {'met' if target['met'] else 'NOT met'}"
    )
    errors = sum(r["errors"] for r in results.values()) + sum(r["errors"] for r in single.values())
    data = {
        "benchmark": "bench.console",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "stored_requests": args.requests,
        "clients": args.clients,
        "duration_seconds": args.duration,
        "one_agent": single,
        "pages": results,
        "targets": [target],
        "errors": errors,
        "valid": errors == 0,
    }
    output = Path(args.output)
    output.write_text(json.dumps(data, indent=2) + "\n")
    print(f"written to {output}")
    return data


def main() -> None:
    sys.exit(0 if run()["valid"] else 1)


if __name__ == "__main__":
    main()
