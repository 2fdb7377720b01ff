"""PNG plots of a ``qroute bench ab`` report (matplotlib, headless): the sessions' TTFT and TPOT as CDFs per
configuration, bytes moved per decoded token, TTFT and TPOT against concurrent sessions, and each qroute run's
remote parts, predicted against measured."""

from __future__ import annotations

from pathlib import Path

from qroute.errors import ConfigError

__all__ = ["plot_report"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the A/B plots need matplotlib (pip install matplotlib)") from exc
    return plt


def plot_report(report: dict, out: Path) -> list[Path]:
    """``latency_cdf.png``, ``bytes_per_token.png``, ``concurrency.png`` and ``predicted.png`` (when the report has
    their data) in ``out``; the paths written."""
    plt = _pyplot()
    rows = report["configs"]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "sessions_ttft_ms", "TTFT (ms)"), (axes[1], "sessions_tpot_ms", "TPOT (ms)")):
        for name, row in rows.items():
            values = sorted(row[key])
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of sessions")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"qroute bench ab: {report['workload']['sessions']} sessions, corpus {report['corpus_tokens']} tokens")
    fig.tight_layout()
    latency = out / "latency_cdf.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    ax.bar(names, [max(rows[n]["bytes_per_token"], 1.0) for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("bytes moved per decoded token (log)")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    moved = out / "bytes_per_token.png"
    fig.savefig(moved, dpi=110)
    plt.close(fig)
    return [latency, moved, *_concurrency(plt, rows, out), *_predicted(plt, rows, out)]


def _concurrency(plt, rows: dict, out: Path) -> list[Path]:
    if max(len(r["by_concurrency"]) for r in rows.values()) < 2:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ttft_ms", "TTFT p50 (ms)"), (axes[1], "tpot_ms", "TPOT p50 (ms)")):
        for name, row in rows.items():
            levels = sorted(row["by_concurrency"], key=int)
            ax.plot([int(c) for c in levels], [row["by_concurrency"][c][key]["p50"] for c in levels], marker="o",
                    label=name)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "concurrency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _predicted(plt, rows: dict, out: Path) -> list[Path]:
    series = [(f"{name} {d}", row["predicted"][d]["points"]) for name, row in rows.items()
              for d in ("route", "fetch") if d in row.get("predicted", {})]  # fmt: skip
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, points in series:
        ax.scatter([p for p, _ in points], [m for _, m in points], s=4, alpha=0.4, label=label)
    low = min(min(min(p, m) for p, m in points) for _, points in series)
    high = max(max(max(p, m) for p, m in points) for _, points in series)
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)  # measured = predicted
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted per part (us, cost model)")
    ax.set_ylabel("measured per part (us)")
    ax.legend(fontsize=8, markerscale=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "predicted.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
