"""The written report of ``qroute bench ab``: ``ab.json`` always, and when every check passed the Markdown tables
(``ab.md``: the configurations, TTFT / TPOT against concurrency, predicted against measured, the ratios against the
issue's targets) and the PNG plots (``qroute.bench.ab_plots``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["markdown", "write_report"]


def _configs_table(report: dict) -> list[str]:
    lines = ["| config | instances | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | ITL p50 / p99 ms | tok/s | "
             "bytes / token | parts route / fetch / local | peak RSS MiB |", "|" + " --- |" * 9]  # fmt: skip
    for name, r in report["configs"].items():
        t, p, i, m = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["moved"]
        lines.append(f"| {name} | {r['instances']} | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                     f"{p['p50']:.1f} / {p['p90']:.1f} / {p['p99']:.1f} | {i['p50']:.1f} / {i['p99']:.1f} | "
                     f"{r['throughput_tok_s']:.1f} | {r['bytes_per_token']:,.0f} | "
                     f"{m['route']:.0f} / {m['fetch']:.0f} / {m['local']:.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in r['peak_rss_mib'])} |")  # fmt: skip
    return lines


def _concurrency_table(report: dict) -> list[str]:
    levels = sorted({int(c) for r in report["configs"].values() for c in r["by_concurrency"]})
    if len(levels) < 2:
        return []
    lines = ["", "TTFT p50 / TPOT p50 (ms) by concurrent sessions:", "",
             "| config | " + " | ".join(str(c) for c in levels) + " |", "|" + " --- |" * (len(levels) + 1)]
    for name, r in report["configs"].items():
        cells = [r["by_concurrency"].get(str(c)) for c in levels]
        lines.append(f"| {name} | " + " | ".join(f"{c['ttft_ms']['p50']:.0f} / {c['tpot_ms']['p50']:.1f}" if c
                                                 else "" for c in cells) + " |")  # fmt: skip
    return lines


def _predicted_table(report: dict) -> list[str]:
    rows = [(name, d, r["predicted"][d], r["moved"]) for name, r in report["configs"].items() if "predicted" in r
            for d in ("route", "fetch") if d in r["predicted"]]  # fmt: skip
    if not rows:
        return []
    lines = ["", "Predicted against measured, per remote part (the cost model's price of the mode it ran):", "",
             "| config | decision | parts | predicted p50 us | measured p50 us | measured / predicted p50 / p90 | "
             "within 2x | mispredictions / predictions |", "|" + " --- |" * 8]  # fmt: skip
    for name, decision, p, m in rows:
        lines.append(f"| {name} | {decision} | {p['parts']} | {p['predicted_us_p50']:.1f} | "
                     f"{p['measured_us_p50']:.1f} | {p['measured_over_predicted_p50']:.2f} / "
                     f"{p['measured_over_predicted_p90']:.2f} | {p['within_2x']:.0%} | "
                     f"{m['mispredictions']:.0f} / {m['predictions']:.0f} |")  # fmt: skip
    return lines


def _ratio_cell(ratio: dict, key: str) -> str:
    value = "n/a" if ratio[key] is None else f"{ratio[key]:.3g}x"
    target = ratio["targets"].get(key)
    return value if target is None else f"{value} ({target['at_most']}x: {'met' if target['met'] else 'MISSED'})"


def _ratios_table(report: dict) -> list[str]:
    if not report.get("ratios"):
        return []
    lines = ["", "Ratios (qroute / stock; target: at most):", "",
             "| pair | bytes / token | TTFT p50 | TPOT p50 |", "|" + " --- |" * 4]
    for pair, r in report["ratios"].items():
        cells = [_ratio_cell(r, key) for key in ("bytes_per_token", "ttft_p50", "tpot_p50")]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines


def _capacity_table(report: dict) -> list[str]:
    c = report.get("capacity")
    if not c:
        return []
    lines = ["", f"Concurrent sessions at the same KV budget: {c['budget_blocks_per_instance']} blocks per instance "
             f"(corpus {c['corpus_blocks']}; qroute's stores {sorted(c['store_blocks'].values())}), offers of up to "
             f"{c['sessions_offered']} sessions at once, {c['max_tokens']} tokens each:", "",
             "| set-up | instances | KV blocks each | sessions at once without preemption | offers: sessions -> most "
             "running at once / decoding at once (preemptions) |", "|" + " --- |" * 5]  # fmt: skip
    for name, s in c["setups"].items():
        offers = ", ".join(f"{n} -> {r['running_at_once']} / {r['decoding_at_once']} ({r['preemptions']})"
                           for n, r in s["levels"].items())  # fmt: skip
        best = f"{s['sessions_without_preemption']}" + ("" if s["saturated"] else " (not saturated: at least)")
        lines.append(f"| {name} | {s['instances']} | {', '.join(map(str, s['kv_blocks_each']))} | {best} | "
                     f"{offers} |")  # fmt: skip
    lines += ["", f"qroute / stock replicas: {c['qroute_over_replicas']}x (target at least {c['target_at_least']}x); "
                  f"qroute / one stock instance with the whole budget: {c['qroute_over_one']}x"]  # fmt: skip
    return lines


def markdown(report: dict) -> str:
    return "\n".join(_configs_table(report) + _concurrency_table(report) + _predicted_table(report)
                     + _ratios_table(report) + _capacity_table(report)) + "\n"  # fmt: skip


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(report, indent=2))
    if report["ok"]:
        (out / "ab.md").write_text(markdown(report))
        from qroute.bench.ab_plots import plot_report

        plot_report(report, out)
