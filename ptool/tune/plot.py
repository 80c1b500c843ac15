"""Latency vs fidelity as a PNG: one point per candidate, the Pareto front marked, excluded ones grey.

matplotlib is imported here only, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ptool.tune.record import Row, Status

#: Errors are drawn on a log axis; exact rows (error 0) sit on this floor.
ERROR_FLOOR = 1e-9


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """The rows no other row beats on both latency and error (among rows within ``max_error``)."""
    ok = sorted((r for r in rows if r.status == Status.OK and r.median_ms is not None),
                key=lambda r: (r.median_ms, r.error or 0.0))
    front, best_error = [], float("inf")
    for r in ok:
        if (r.error or 0.0) < best_error:
            front.append(r)
            best_error = r.error or 0.0
    return front


@contextlib.contextmanager
def _figure(path: Path, size: tuple[float, float], title: str) -> Iterator[Any]:
    """Axes to draw on; once drawn, titled, gridded, with the legend, saved to ``path`` (PNG) and closed.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'ptool[dev]'``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        yield ax
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_rows(rows: Sequence[Row], path: Path, *, max_error: float, title: str = "") -> Path:
    """Draw the latency-fidelity plot of ``rows`` to ``path`` (PNG); returns ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'ptool[dev]'``).
    """
    measured = [r for r in rows if r.median_ms is not None and r.error is not None]
    front = pareto_front(rows)
    with _figure(path, (9, 5.5), title or "ptool autotune: latency vs fidelity (grey x: excluded)") as ax:
        placed: list[tuple[float, float]] = []
        for r in sorted(measured, key=lambda r: r.median_ms):
            y = max(r.error, ERROR_FLOOR)
            # Points close together (same error, similar latency) get their labels stacked, not overprinted.
            near = sum(1 for px, py in placed if abs(math.log10(px / r.median_ms)) < 1.0
                       and abs(math.log10(py / y)) < 0.3)
            placed.append((r.median_ms, y))
            if r.status == Status.OK:
                ax.scatter(r.median_ms, y, s=60 if r.winner else 30, marker="*" if r.winner else "o",
                           color="tab:red" if r.winner else ("tab:blue" if r in front else "tab:cyan"), zorder=3)
                color = "black"
            else:
                ax.scatter(r.median_ms, y, s=25, marker="x", color="0.6", zorder=2)
                color = "0.55"
            ax.annotate(r.label, (r.median_ms, y), fontsize=6.5, color=color, xytext=(4, 3 + 9 * near),
                        textcoords="offset points", arrowprops={"arrowstyle": "-", "color": "0.8", "lw": 0.5}
                        if near else None)
        if front:
            ax.step([r.median_ms for r in front], [max(r.error, ERROR_FLOOR) for r in front], where="post",
                    color="tab:blue", linewidth=1, label="Pareto front", zorder=1)
        ax.axhline(max(max_error, ERROR_FLOOR), color="tab:red", linestyle="--", linewidth=0.8,
                   label=f"max_error {max_error:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency, median ms (log)")
        ax.set_ylabel(f"error vs original (log; exact = {ERROR_FLOOR:g})")
    return path


def plot_size_error(front: Sequence[dict], path: Path, *, chosen: dict | None = None, title: str = "") -> Path:
    """Draw a ``quantize:mode=auto`` Pareto front (``notes["mixed_precision"]["front"]``: size fraction vs
    predicted and measured output error) to ``path`` (PNG), the chosen configuration marked; returns ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'ptool[dev]'``).
    """
    with _figure(path, (7, 4.5), title or "quantize:mode=auto: size vs error") as ax:
        xs = [p["fraction"] for p in front]
        ax.step(xs, [max(p["predicted_error"], ERROR_FLOOR) for p in front], where="post", color="tab:blue",
                linewidth=1, label="predicted (sum of per-layer errors)")
        measured = [(p["fraction"], max(p["measured_error"], ERROR_FLOOR)) for p in front
                    if p.get("measured_error") is not None]
        if measured:
            ax.scatter(*zip(*measured), s=25, color="tab:blue", zorder=3, label="measured (layers together)")
        if chosen is not None:
            ax.scatter([chosen["fraction"]], [max(chosen["measured_error"], ERROR_FLOOR)], s=80, marker="*",
                       color="tab:red", zorder=4, label=f"chosen (budget {chosen['budget']:g})")
            ax.axvline(chosen["budget"], color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("weight bytes, fraction of fp32")
        ax.set_ylabel("output error (relative MSE, log)")
    return path
