"""``make bench``: every benchmark in one run, then one table of the targets (each met or not),
``bench/results.json`` with all the figures and ``bench/results.png``, a chart of throughput
and latency.

The parts, each against its own baseline measured in the same run:

* intake (``bench.intake``): messages/s answered 250 by ``mailproc serve`` against a bare
  aiosmtpd sink, under Postfix's ``smtp-source`` when installed;
* end to end, scaling and memory (``bench.endtoend``): signed requests and spoofs through a real
  ``serve``, latency from 250 to the stored decision, the evaluation rate against a bare
  ``dkim.verify`` loop, the same with 1,000 to 100,000 messages stored, peak RSS with 200
  sessions;
* the sender check alone (``bench.verify``), part by part, against the bare loop in-process;
* console pages (``bench.console``) with 100,000 requests stored.

``--quick`` runs each part briefly (a smoke run, not figures to quote); ``--only`` picks parts.
A target not met is reported; a lost or wrongly decided message, or a part that fails, makes
the command exit 1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.intake import exit_on_signal

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
CHART = HERE / "results.png"
PARTS = ("intake", "endtoend", "verify", "console")

QUICK = {
    "intake": ["--repeats", "1", "--duration", "2", "--warmup", "1"],
    "endtoend": ["--quick"],
    "verify": ["--seconds", "0.5", "--repeats", "1"],
    "console": ["--requests", "10000", "--duration", "2"],
}


def _runner(name: str) -> Callable[[list[str]], dict[str, Any]]:
    if name == "intake":
        from bench import intake

        return intake.run
    if name == "endtoend":
        from bench import endtoend

        return endtoend.run
    if name == "verify":
        from bench import verify

        return verify.run
    from bench import console

    return console.run


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the benchmarks, as (name, measured, met)."""
    found: list[dict[str, Any]] = []
    intake = results.get("intake")
    if intake:
        for scenario in intake.get("scenarios", []):
            found.append(
                {
                    "target": f"intake >= {scenario['target_ratio']:.0%} of the bare sink "
                    f"({scenario['scenario']})",
                    "measured": f"{scenario['ratio']:.3f} ({scenario['mailproc_msgs_per_s']} "
                    f"vs {scenario['sink_msgs_per_s']} msg/s)",
                    "met": bool(scenario["target_met"]),
                }
            )
    end = results.get("endtoend")
    if end:
        for name, target in end.get("targets", {}).items():
            value = next(v for k, v in target.items() if k.startswith("value"))
            unit = {"value_ms": " ms", "value_mb": " MB"}.get(
                next(k for k in target if k.startswith("value")), ""
            )
            found.append({"target": name, "measured": f"{value}{unit}", "met": target["met"]})
    console = results.get("console")
    if console:
        for target in console.get("targets", []):
            found.append(
                {"target": target["name"], "measured": target["measured"], "met": target["met"]}
            )
    return found


def chart(results: dict[str, Any], path: Path) -> bool:
    """Throughput (left) and latency (right) of every part, each beside its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float]] = []  # label, baseline, mailproc
    intake = results.get("intake") or {}
    for scenario in intake.get("scenarios", []):
        bars.append(
            (
                f"intake\n{scenario['scenario']}",
                scenario["sink_msgs_per_s"],
                scenario["mailproc_msgs_per_s"],
            )
        )
    end = results.get("endtoend") or {}
    e2e = end.get("end_to_end")
    if e2e:
        burst = e2e["burst"]
        evaluated = (
            burst.get("evaluated_after_intake_idle_msgs_per_s")
            or burst["evaluated_overall_msgs_per_s"]
        )
        bars.append(("evaluation\n(workers)", e2e["bare_dkim_verify"]["msgs_per_s"], evaluated))
    verify = results.get("verify") or {}
    if verify:
        bars.append(
            (
                "sender check\n(1 process)",
                verify["bare_dkim_verify_per_s"],
                verify["full_check_per_s"],
            )
        )
    latency: list[tuple[str, list[float | None]]] = []  # label, p50/p95/p99
    if e2e:
        seen = e2e["stream"]["latency_250_to_decision_visible"]
        latency.append(("250 -> decision", [seen["p50_ms"], seen["p95_ms"], seen["p99_ms"]]))
    for row in (end.get("scaling") or {}).get("rows", []):
        if not row["stored"]:
            continue  # the stream above, again
        latency.append((f"{row['stored']:,} stored", [row["p50_ms"], row["p95_ms"], row["p99_ms"]]))
    console = results.get("console") or {}
    for page, figures in (console.get("one_agent") or {}).items():
        latency.append((f"console: {page}", [figures["p50_ms"], figures["p95_ms"], None]))
    if not bars and not latency:
        return False

    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5))
    positions = range(len(bars))
    width = 0.38
    left.bar(
        [p - width / 2 for p in positions],
        [b[1] for b in bars],
        width,
        label="baseline (bare sink / bare dkim.verify)",
        color="#9aa5b1",
    )
    left.bar(
        [p + width / 2 for p in positions],
        [b[2] for b in bars],
        width,
        label="mailproc",
        color="#1f6feb",
    )
    for position, (_, base, ours) in zip(positions, bars, strict=True):
        left.annotate(
            f"{ours / base:.3f}" if base else "",
            (position + width / 2, ours),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_xticks(list(positions), [b[0] for b in bars], fontsize=8)
    left.set_ylabel("messages per second")
    left.set_title("Throughput (ratio to baseline above the bars)")
    left.legend(fontsize=8)

    rows = range(len(latency))
    for offset, (index, label, color) in zip(
        (-0.27, 0.0, 0.27),
        ((0, "p50", "#54aeff"), (1, "p95", "#0969da"), (2, "p99", "#0a3069")),
        strict=True,
    ):
        values = [row[1][index] or 0.0 for row in latency]
        right.barh([r + offset for r in rows], values, 0.26, label=label, color=color)
    right.axvline(
        250, color="#cf222e", linestyle="--", linewidth=1, label="250 ms: end-to-end p99 target"
    )
    right.axvline(100, color="#bf8700", linestyle=":", linewidth=1, label="100 ms: queue page")
    right.set_yticks(list(rows), [row[0] for row in latency], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("milliseconds")
    right.set_title("Latency")
    right.legend(fontsize=8, loc="lower right")
    when = results.get("finished_at", "")
    figure.suptitle(f"mailproc benchmarks {when} ({os.cpu_count()} CPUs)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every part")
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    parser.add_argument("--output", default=str(RESULTS), help="combined JSON results")
    parser.add_argument("--chart", default=str(CHART), help="PNG chart")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)

    started = time.monotonic()
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    scratch = Path(args.output).parent
    for name in args.only or PARTS:
        print(f"\n=== {name} ===", flush=True)
        part_args = list(QUICK[name]) if args.quick else []
        part_args += ["--output", str(scratch / f"{name}.json")]
        try:
            results[name] = _runner(name)(part_args)
        except Exception:  # one part failing must not hide the others' figures
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr, flush=True)
            continue
        if not results[name].get("valid", False):
            failures[name] = "invalid run: a message lost or decided wrongly, or an error"

    found = targets(results)
    combined = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_seconds": round(time.monotonic() - started, 1),
        "quick": args.quick,
        "targets": found,
        "failures": failures,
        **results,
    }
    Path(args.output).write_text(json.dumps(combined, indent=2) + "\n")
    drawn = chart(combined, Path(args.chart))

    print("\n=== targets ===")
    width = max((len(t["target"]) for t in found), default=10)
    for target in found:
        verdict = "met" if target["met"] else "NOT met"
        print(f"{target['target']:<{width}}  {target['measured']:<40} {verdict}")
    for name, why in failures.items():
        print(f"{name}: FAILED: {why.strip().splitlines()[-1]}")
    print(f"\nresults: {args.output}" + (f"; chart: {args.chart}" if drawn else ""))
    print(f"run time {combined['run_seconds']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
