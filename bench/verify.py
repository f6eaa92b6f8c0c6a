"""Verification throughput: messages/s through mailproc's whole sender check (strict parsing,
author, every DKIM signature, SPF, alignment, upstream results, ARC, DMARC record) with a warm
DNS cache, beside a bare ``dkim.verify`` loop on the same messages in the same run.

Keys and SPF records are served by a DNS server on loopback; the bare loop reads its keys from
a dict, so it pays no DNS cost at all. Prints a table and writes bench/verify.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim

from mailproc.auth import Authenticator, Envelope, Verdict
from mailproc.auth.arc_check import check_arc
from mailproc.auth.author import identify_author
from mailproc.auth.dkim_check import check_dkim
from mailproc.auth.spf_check import check_spf
from mailproc.auth.upstream import check_upstream
from mailproc.config import AuthSettings, DnsSettings
from mailproc.intake import wire_flags
from mailproc.message import parse_message
from tests.dkimkeys import build_message, ed25519_key, publish, rsa_key, sign
from tests.dnsserver import ZoneServer

RESULTS = Path(__file__).resolve().parent / "verify.json"


def corpus(server: ZoneServer, count: int) -> tuple[list[bytes], dict[str, bytes]]:
    """Signed reset requests (RSA-2048, RSA-1024 and Ed25519, one in four spoofed)."""
    keys = [rsa_key(2048, selector="b2048"), rsa_key(1024, selector="b1024"), ed25519_key()]
    records = {}
    for key in keys:
        publish(server, key)
        records[f"{key.selector}._domainkey.{key.domain}."] = key.record.encode()
    server.add_txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
    server.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    body = "Hello support,\n\nPlease reset my security question.\n\n" + "Regards,\nAlice\n" * 20
    messages = []
    for n in range(count):
        raw = sign(build_message(body=body), keys[n % len(keys)])
        if n % 4 == 3:  # spoofed: the body was changed after signing
            raw = raw.replace(b"Regards", b"Regardz", 1)
        messages.append(raw)
    return messages, records


def rate(run: Callable[[bytes], object], messages: list[bytes], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for raw in messages:
            run(raw)
        done += len(messages)
    return done / (time.perf_counter() - start)


def stages(
    authenticator: Authenticator, envelope: Envelope, messages: list[bytes], seconds: float
) -> dict[str, float]:
    """Microseconds a message for each part of the check, run one by one on the same corpus:
    where the time beyond the bare DKIM loop goes."""
    now = datetime.now(UTC)
    parsed = {raw: parse_message(raw) for raw in messages}
    headers = {raw: [(h.name, h.value) for h in parsed[raw].headers] for raw in messages}
    settings = authenticator.settings
    parts: dict[str, Callable[[bytes], object]] = {
        "strict parse": parse_message,
        "author": lambda raw: identify_author(parsed[raw], wire_flags(raw)),
        "dkim (every signature)": lambda raw: check_dkim(
            raw,
            "example.org",
            settings.alignment,
            authenticator.resolver,
            settings.max_signatures,
            settings.min_rsa_bits,
            now,
        ),
        "spf": lambda raw: check_spf(
            envelope.client_ip,
            envelope.mail_from,
            envelope.helo,
            "example.org",
            settings.alignment,
            authenticator.resolver,
            authenticator.dns_timeout,
        ),
        "upstream results and arc": lambda raw: (
            check_upstream(headers[raw], settings.trusted_authserv_ids, "example.org", "relaxed"),
            check_arc(
                raw,
                headers[raw],
                settings.trusted_arc_sealers,
                "example.org",
                settings.alignment,
                authenticator.resolver,
                settings.min_rsa_bits,
            ),
        ),
        "dmarc record": lambda raw: authenticator._dmarc("example.org"),
    }
    return {name: round(1e6 / rate(part, messages, seconds), 1) for name, part in parts.items()}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__)
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args(argv)

    with ZoneServer(ttl=3600, negative_ttl=3600) as server:
        messages, records = corpus(server, args.messages)
        authenticator = Authenticator(
            AuthSettings(), DnsSettings(nameservers=(server.address,), timeout_seconds=2.0)
        )
        envelope = Envelope("192.0.2.25", "alice@example.org", "mail.example.org")

        def full(raw: bytes) -> Verdict:
            return authenticator.evaluate(raw, envelope, datetime.now(UTC))

        def bare(raw: bytes) -> object:
            return dkim.verify(raw, dnsfunc=lambda name, timeout=5: records.get(name.decode()))

        verdicts = [full(raw) for raw in messages]  # also warms the DNS cache
        strong = sum(v.strength == "strong" for v in verdicts)
        valid = strong == len(messages) - len(messages) // 4
        bare_rates, full_rates = [], []
        for _ in range(args.repeats):
            bare_rates.append(rate(bare, messages, args.seconds))
            full_rates.append(rate(full, messages, args.seconds))
        parts = stages(authenticator, envelope, messages, max(args.seconds / 3, 0.5))

    bare_rate, full_rate = statistics.median(bare_rates), statistics.median(full_rates)
    ratio = full_rate / bare_rate
    print(f"{'verification, one process':<32}{'messages/s':>12}{'us/message':>12}")
    print(f"{'bare dkim.verify loop':<32}{bare_rate:>12.1f}{1e6 / bare_rate:>12.1f}")
    print(f"{'mailproc whole sender check':<32}{full_rate:>12.1f}{1e6 / full_rate:>12.1f}")
    print(f"{'ratio (check / bare)':<32}{ratio:>12.2f}")
    print("\nthe check's parts, one by one (us/message):")
    for name, micros in parts.items():
        print(f"  {name:<30}{micros:>12.1f}")
    if not valid:
        print(f"error: {strong} strong verdicts, expected {len(messages) - len(messages) // 4}")
    data = {
        "benchmark": "bench.verify",
        "bare_dkim_verify_per_s": round(bare_rate, 1),
        "full_check_per_s": round(full_rate, 1),
        "ratio": round(ratio, 3),
        "runs": {"bare": bare_rates, "full": full_rates},
        "stages_us": parts,
        "messages": len(messages),
        "python": platform.python_version(),
        "valid": valid,
    }
    Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
    return data


def main() -> None:
    sys.exit(0 if run()["valid"] else 1)


if __name__ == "__main__":
    main()
