"""PNG plots of a ``qroute bench ab`` report (matplotlib, headless): the sessions' TTFT and TPOT as CDFs per
configuration, and bytes moved per decoded token."""

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
    """``latency_cdf.png`` and ``bytes_per_token.png`` in ``out``; the paths written."""
    plt = _pyplot()
    rows = report["configs"]
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
    return [latency, moved]
