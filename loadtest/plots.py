"""PNG plots of a run (optional: needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["latency_kind", "plot_runs", "plotting_available"]


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def latency_kind(scenario: str) -> tuple[str, str]:
    """(what a run's latency is, what it counts): ``calls`` times invite → ring
    (the callee's ``call.incoming``), the other scenarios their deliveries."""
    if scenario == "calls":
        return "invite → ring latency", "calls"
    return "delivery latency", "deliveries"


def plot_runs(runs: list[dict[str, Any]], prefix: Path) -> list[Path]:
    """``<prefix>-latency-time.png`` (p50/p99/max per second) and
    ``<prefix>-latency-hist.png`` (the latency's distribution), one curve per run;
    nothing for runs without latencies (idle)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    prefix.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = [r for r in runs if r["timeline"]]
    if not runs:
        return written
    what, counted = latency_kind(runs[0]["scenario"])

    fig, ax = plt.subplots(figsize=(10, 5))
    for run in runs:
        label = f"{run['target']} rate {run['settings']['rate']:g}"
        t = [p["t"] for p in run["timeline"]]
        (line,) = ax.plot(t, [p["p50"] for p in run["timeline"]], label=f"{label} p50")
        ax.plot(
            t,
            [p["p99"] for p in run["timeline"]],
            "--",
            color=line.get_color(),
            label=f"{label} p99",
        )
        ax.plot(
            t,
            [p["max"] for p in run["timeline"]],
            ":",
            color=line.get_color(),
            label=f"{label} max",
        )
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"{what} (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{runs[0]['scenario']}: {what} over time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(f"{prefix}-latency-time.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(10, 5))
    for run in runs:
        rows = run["histogram_us"]
        total = sum(n for _, _, n in rows) or 1
        # Density (share per ms): buckets widen with the latency (log-linear), so raw
        # counts per bucket would jump at every power of two.
        xs = [low / 1000 for low, _, _ in rows]
        ys = [n / total / ((high - low) / 1000) for low, high, n in rows]
        ax.step(xs, ys, where="post", label=f"{run['target']} rate {run['settings']['rate']:g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"{what} (ms, log)")
    ax.set_ylabel(f"share of {counted} per ms")
    ax.set_yscale("log")
    ax.set_title(f"{runs[0]['scenario']}: {what} histogram")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(f"{prefix}-latency-hist.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written
