"""The report's own figures (the lab experiments draw theirs): PNG files, matplotlib on Agg."""

from __future__ import annotations

from pathlib import Path

from hdopt.io import save_figure
from hdopt.plotting import pyplot


def dev_curves(curves: dict[str, list[dict]], baselines: dict[str, float], path: Path) -> Path:
    """Dev accuracy against forward passes for each trained method, with flat lines for the baselines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, records) in enumerate(curves.items()):
        ax.plot(
            [r["forwards"] for r in records],
            [r["dev_accuracy"] for r in records],
            marker="o",
            ms=3,
            color=f"C{i}",
            label=name,
        )
    for j, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(curves) + j}", label=f"{name} (test)")
    ax.set(xlabel="forward passes", ylabel="dev accuracy (%)", title="SST-2: accuracy vs forward passes")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def memory_bars(peaks: dict[str, float], path: Path) -> Path:
    """Peak memory per mode as bars, labelled in MiB and as a multiple of the first mode's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    names, values = list(peaks), list(peaks.values())
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:,.0f} MiB\n{value / values[0]:.2f}x",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="peak memory (MiB)", title="one training step, same batch")
    ax.set_ylim(0, max(values) * 1.25)
    return save_figure(fig, path)


def grouped_bars(groups: dict[str, dict[str, float]], ylabel: str, title: str, path: Path) -> Path:
    """Bars grouped by key (e.g. task), one bar per inner key (e.g. method)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    inner = list(next(iter(groups.values())))
    width = 0.8 / len(inner)
    for i, name in enumerate(inner):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [groups[k][name] for k in groups], width, label=name, color=f"C{i}")
    ax.set_xticks([g + width * (len(inner) - 1) / 2 for g in range(len(groups))], list(groups))
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
