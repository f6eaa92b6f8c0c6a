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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dkim

from mailproc.auth import Authenticator, Envelope
from mailproc.config import AuthSettings, DnsSettings
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with ZoneServer(ttl=3600, negative_ttl=3600) as server:
        messages, records = corpus(server, args.messages)
        authenticator = Authenticator(
            AuthSettings(), DnsSettings(nameservers=(server.address,), timeout_seconds=2.0)
        )
        envelope = Envelope("192.0.2.25", "alice@example.org", "mail.example.org")

        def full(raw: bytes) -> object:
            return authenticator.evaluate(raw, envelope, datetime.now(UTC))

        def bare(raw: bytes) -> object:
            return dkim.verify(raw, dnsfunc=lambda name, timeout=5: records.get(name.decode()))

        verdicts = [full(raw) for raw in messages]  # also warms the DNS cache
        strong = sum(v.strength == "strong" for v in verdicts)
        assert strong == len(messages) - len(messages) // 4, "corpus verdicts are off"
        bare_rates, full_rates = [], []
        for _ in range(args.repeats):
            bare_rates.append(rate(bare, messages, args.seconds))
            full_rates.append(rate(full, messages, args.seconds))

    bare_rate, full_rate = statistics.median(bare_rates), statistics.median(full_rates)
    ratio = full_rate / bare_rate
    print(f"{'verification':<28}{'messages/s':>12}")
    print(f"{'bare dkim.verify loop':<28}{bare_rate:>12.1f}")
    print(f"{'mailproc full check':<28}{full_rate:>12.1f}")
    print(f"{'ratio (full / bare)':<28}{ratio:>12.2f}")
    RESULTS.write_text(
        json.dumps(
            {
                "bare_dkim_verify_per_s": bare_rate,
                "full_check_per_s": full_rate,
                "ratio": ratio,
                "runs": {"bare": bare_rates, "full": full_rates},
                "messages": len(messages),
                "python": platform.python_version(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
