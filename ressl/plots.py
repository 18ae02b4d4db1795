"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend; PNGs by Agg).

Each ``plot_*`` takes plain records or arrays and returns a :class:`~matplotlib.figure.Figure`, or ``None`` when
the run logged nothing to draw; :func:`save_png` writes one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ressl.checkpoint import replaced, writing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_WRITE_FIX = "make the run directory writable, or free disk space"
HEALTH_KEYS = ("teacher_entropy", "student_entropy", "student_std", "teacher_std", "queue_fill")


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, value)`` of every record holding a finite number under ``key`` (and ``x``), sorted by x."""
    points = [(float(r[x]), float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float)) and math.isfinite(r[key])]
    points.sort(key=lambda p: p[0])
    if not points:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*points)
    return np.asarray(xs), np.asarray(ys)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_training(records: list[dict[str, Any]]) -> Figure | None:
    """Two panels over optimiser steps: the relational loss (nats) and the learning rate (EMA momentum on a right axis)."""
    steps, loss = series(records, "loss")
    if not len(steps):
        return None
    lr_steps, lr = series(records, "lr")
    fig = _figure(7.5, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, loss, color="tab:blue", marker="." if len(steps) < 50 else None, label="relational loss")
    top.set_ylabel("loss (nats)")
    top.set_title("Training loss: cross-entropy of the student's relation to the teacher's")
    top.grid(alpha=0.3)
    bottom.plot(lr_steps, lr, color="tab:orange", label="learning rate")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimiser step")
    bottom.grid(alpha=0.3)
    m_steps, momentum = series(records, "ema_momentum")
    handles, labels = bottom.get_legend_handles_labels()
    if len(m_steps):
        right = bottom.twinx()
        right.plot(m_steps, momentum, color="tab:green", linestyle="--", label="teacher EMA momentum")
        right.set_ylabel("EMA momentum")
        h, lab = right.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    bottom.legend(handles, labels, loc="best", fontsize="small")
    return fig


def plot_knn(records: list[dict[str, Any]]) -> Figure | None:
    """Weighted-kNN top-1 and top-5 accuracy (%) of the student's backbone on the test split, over epochs."""
    epochs, top1 = series(records, "knn_top1", x="epoch")
    if not len(epochs):
        return None
    epochs5, top5 = series(records, "knn_top5", x="epoch")
    fig = _figure(7.5, 3.8)
    ax = fig.subplots()
    ax.plot(epochs, top1, marker="o", color="tab:blue", label="top-1")
    if len(epochs5):
        ax.plot(epochs5, top5, marker="s", linestyle="--", color="tab:gray", label="top-5")
    for e, v in zip(epochs, top1):
        ax.annotate(f"{v:.1f}", (e, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    ax.set_xlabel("epochs completed (0: random initialisation)")
    ax.set_ylabel("kNN accuracy (%)")
    ax.set_title("Weighted kNN on the test split (training images as the bank)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def plot_health(records: list[dict[str, Any]], queue_size: int | None, out_dim: int | None) -> Figure | None:
    """Relation entropies (nats) with ``log K`` marked, and the embeddings' spread with ``1/sqrt(D)`` marked
    (queue fill on a right axis); only the panels whose keys were logged."""
    data = {key: series(records, key) for key in HEALTH_KEYS}
    entropy_keys = [k for k in ("teacher_entropy", "student_entropy") if len(data[k][0])]
    spread_keys = [k for k in ("student_std", "teacher_std", "queue_fill") if len(data[k][0])]
    panels = [p for p in (entropy_keys, spread_keys) if p]
    if not panels:
        return None
    fig = _figure(7.5, 2.8 + 2.6 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colours = {"teacher_entropy": "tab:red", "student_entropy": "tab:blue", "student_std": "tab:blue",
               "teacher_std": "tab:red", "queue_fill": "tab:gray"}
    labels = {"teacher_entropy": "teacher (weak view)", "student_entropy": "student (strong view)",
              "student_std": "student", "teacher_std": "teacher", "queue_fill": "queue fill (right axis)"}
    for ax, keys in zip(axes, panels):
        handles = []
        if keys is entropy_keys:
            for k in keys:
                handles += ax.plot(*data[k], color=colours[k], label=labels[k])
            if queue_size:
                handles.append(ax.axhline(math.log(queue_size), color="black", linestyle=":",
                                          label=f"log K = {math.log(queue_size):.2f} (uniform relation)"))
            ax.set_ylim(bottom=0)
            ax.set_ylabel("relation entropy (nats)")
            ax.set_title("Entropy of the relation to the queue (log K: no structure, 0: one-hot)")
        else:
            for k in keys:
                if k != "queue_fill":
                    handles += ax.plot(*data[k], color=colours[k], label=labels[k])
            if out_dim and any(k != "queue_fill" for k in keys):
                handles.append(ax.axhline(1 / math.sqrt(out_dim), color="black", linestyle=":",
                                          label=f"1/sqrt(D) = {1 / math.sqrt(out_dim):.3f} (uniform on the sphere)"))
            ax.set_ylim(bottom=0)
            ax.set_ylabel("std of unit embeddings")
            ax.set_title("Spread of the embeddings across the batch (0: collapse)")
            if "queue_fill" in keys:
                right = ax.twinx()
                handles += right.plot(*data["queue_fill"], color=colours["queue_fill"], linestyle="--", label=labels["queue_fill"])
                right.set_ylabel("fraction of the queue filled")
                right.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, loc="best", fontsize="small")
    axes[-1].set_xlabel("optimiser step")
    return fig


def plot_embedding_map(points: np.ndarray, labels: np.ndarray, names: list[str], method: str, what: str) -> Figure:
    """Scatter of ``points`` (N, 2) coloured by class, one legend entry per class name."""
    fig = _figure(7.5, 6.2)
    ax = fig.subplots()
    classes = sorted(int(c) for c in np.unique(labels))
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    for j, c in enumerate(classes):
        sel = labels == c
        name = names[c] if 0 <= c < len(names) else ("unlabelled" if c < 0 else str(c))
        colour = cmap(j % cmap.N) if cmap.N <= 20 else cmap(j / max(1, len(classes) - 1))
        ax.scatter(points[sel, 0], points[sel, 1], s=8 if len(points) > 500 else 18, color=colour, label=name, alpha=0.8, linewidths=0)
    ax.set_title(f"{method} of {what} ({len(points)} images), coloured by class")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 30:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", markerscale=2, title="class")
    return fig


def plot_retrieval(
    queries: list[np.ndarray], query_labels: list[int], neighbours: list[list[np.ndarray]],
    neighbour_labels: list[list[int]], sims: list[list[float]], names: list[str],
) -> Figure:
    """One row per query: the query image, then its nearest training images with class and cosine similarity;
    a green frame marks a neighbour of the query's class, red another class."""
    rows, cols = len(queries), 1 + max(len(n) for n in neighbours)
    fig = _figure(1.35 * cols + 0.3, 1.55 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    name = lambda c: names[c] if 0 <= c < len(names) else ("?" if c < 0 else str(c))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                image, title, colour, width = queries[r], f"query\n{name(query_labels[r])}", "black", 2.5
            elif c - 1 < len(neighbours[r]):
                y = neighbour_labels[r][c - 1]
                image, title = neighbours[r][c - 1], f"{name(y)}\ncos {sims[r][c - 1]:.2f}"
                labelled = y >= 0 and query_labels[r] >= 0
                colour, width = ("tab:green" if y == query_labels[r] else "tab:red") if labelled else "gray", 2.5
            else:
                ax.set_axis_off()
                continue
            ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) <= 64 else "antialiased")
            ax.set_title(title, fontsize=8)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
    legend = "; green: same class, red: another" if any(label >= 0 for label in query_labels) else " (unlabelled images)"
    fig.suptitle(f"Nearest training images by backbone features (cosine){legend}", fontsize=10)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path``; a failed write is a one-line :class:`ressl.checkpoint.WriteError`."""
    with writing(str(path), REPORT_WRITE_FIX), replaced(path) as f:  # an earlier PNG stays whole if the write fails
        fig.savefig(f, format="png", dpi=100, facecolor="white")
    return path
