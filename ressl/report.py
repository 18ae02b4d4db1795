"""What a run learned: a Markdown + HTML report of a run directory (``ressl report``).

``make_report(run_dir)`` reads ``config.yaml``, ``metrics.jsonl`` and ``final.json`` and writes
``report.md`` (PNGs beside it in ``report_files/``) and ``report.html`` (the same PNGs embedded as
base64 data URIs: one file that opens offline). With the checkpoint and the run's data it adds a
2-D map of the test embeddings (t-SNE, or UMAP when ``umap-learn`` is installed) and a retrieval
grid (test images and their nearest training images by backbone features, computed as the run's kNN
checks compute them: :func:`ressl.evaluate.checkpoint_features`). The figures are drawn in ``ressl.plots``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ressl import dist, progress
from ressl.checkpoint import replaced, writing
from ressl.errors import DataError
from ressl.meter import read_metrics
from ressl.plots import (
    HEALTH_KEYS,
    REPORT_WRITE_FIX,
    plot_embedding_map,
    plot_health,
    plot_knn,
    plot_retrieval,
    plot_training,
    save_png,
    series,
)
from ressl.rundir import run_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ressl.data import Dataset, Split

CLASS_NAMES: dict[str, list[str]] = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
}
FILES_DIR = "report_files"  # PNGs beside report.md
PLOT_NAMES = {"training", "knn", "health", "embedding_map", "retrieval"}  # each FILES_DIR/NAME.png


class RunDirError(DataError):
    """RUN_DIR is not a run directory; the message names the fix."""


def class_names(ds: Dataset) -> list[str]:
    """CIFAR-10/STL-10: the standard names; image folders: their class folder names; else the label numbers."""
    for split in (ds.bank, ds.train, ds.test):
        if split is not None and split.folder is not None and split.folder.classes:
            return list(split.folder.classes)
    names = CLASS_NAMES.get(ds.name)
    if names is not None and len(names) == ds.num_classes:
        return list(names)
    return [str(i) for i in range(ds.num_classes)]


# --- neighbours and maps of the features ------------------------------------------------------


@torch.no_grad()
def nearest(gallery: torch.Tensor, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices (M, k) of the ``k`` nearest rows of ``gallery`` (N, F) to each query (M, F),
    most similar first. ``exclude`` (M,): a gallery index each query must not return (itself, when the
    queries are drawn from the gallery)."""
    gallery = F.normalize(gallery.float(), dim=1)
    k = min(k, gallery.shape[0] - (exclude is not None))
    sims, idxs = [], []
    for start in range(0, queries.shape[0], chunk_size):
        sim = F.normalize(queries[start : start + chunk_size].float(), dim=1) @ gallery.T  # (m, N)
        if exclude is not None:
            sim.scatter_(1, exclude[start : start + chunk_size, None].to(sim.device), -math.inf)
        top = sim.topk(k, dim=1)
        sims.append(top.values)
        idxs.append(top.indices)
    return torch.cat(sims), torch.cat(idxs)


def project_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the unit-normalised ``features`` (N, F) and the method's name:
    UMAP (cosine) when ``umap-learn`` is importable, else t-SNE after PCA to 50 dimensions."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        umap = None
    n = x.shape[0]
    if umap is not None:
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed,
                            n_jobs=1)  # as a seed makes it (umap-learn warns when it has to say so)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP"
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "t-SNE"


def display_image(split: Split, i: int) -> np.ndarray:
    """Image ``i`` of ``split`` as uint8 (H, W, 3) for display (grey for an unreadable file)."""
    if split.images is not None:
        img = split.images[i].cpu()
        img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
        return img.permute(1, 2, 0).numpy()
    from ressl.decode import load_rgb

    assert split.folder is not None
    loaded = load_rgb(split.folder.files[i])
    return np.full((8, 8, 3), 128, np.uint8) if loaded is None else loaded.permute(1, 2, 0).numpy()


def pick_queries(labels: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` indices, classes taken in turn (a random member of each), so the grid shows many classes."""
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen: list[int] = []
    while len(chosen) < min(n, len(labels)):
        seen: set[int] = set()
        for i in order:
            if len(chosen) == n:
                break
            if int(i) not in chosen and int(labels[i]) not in seen:
                chosen.append(int(i))
                seen.add(int(labels[i]))
    return chosen


# --- the report ----------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`make_report` wrote, and what it left out and why."""

    markdown: Path
    html: Path
    images: dict[str, Path] = field(default_factory=dict)  # plot name -> PNG
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [self.markdown, self.html, *self.images.values()]


@dataclass
class _Doc:
    """The report's content, rendered to both Markdown and HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> None:
        self.blocks.append((kind, value))

    def to_markdown(self, base: Path) -> str:
        out = []
        for kind, value in self.blocks:
            if kind in ("h1", "h2"):
                out.append(("# " if kind == "h1" else "## ") + value)
            elif kind == "p":
                out.append(value)
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in value))
            elif kind == "table":
                header, *rows = value
                cell = lambda v: str(v).replace("|", "\\|")
                out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]))
            elif kind == "img":
                path, caption = value
                out.append(f"![{path.stem}]({path.relative_to(base).as_posix()})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def to_html(self, title: str) -> str:
        e = html.escape
        out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
               ("<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
                "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
                "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}"
                "figcaption{color:#555;font-size:90%}code{background:#f3f3f3}</style></head><body>")]
        for kind, value in self.blocks:
            if kind in ("h1", "h2"):
                out.append(f"<{kind}>{e(value)}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{e(value)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{e(str(item))}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, *rows = value
                out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>")
            elif kind == "img":
                path, caption = value
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f"<figure><img alt=\"{e(path.stem)}\" src=\"data:image/png;base64,{data}\">"
                           f"<figcaption>{e(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "none" if v is None else str(v)


def _summary_rows(cfg: dict[str, Any], final: dict[str, Any] | None, records: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["dataset", f"{cfg.get('dataset')} ({cfg.get('data') or 'built in'})"],
            ["encoder", f"{cfg.get('backbone')} width {cfg.get('width')}, {cfg.get('image_size')} px, embeddings of {cfg.get('out_dim')}"],
            ["method", (f"queue K={cfg.get('queue_size')}, temperatures student {cfg.get('student_temperature')} / "
                        f"teacher {cfg.get('teacher_temperature')}, EMA {cfg.get('ema_momentum')}")]]
    if final:
        rows.append(["epochs done", f"{final.get('epochs')} of {cfg.get('epochs')} ({final.get('steps')} steps)"])
        if final.get("minutes") is not None:
            rows.append(["training time", f"{final['minutes']:.1f} min"])
        if final.get("loss") is not None:
            rows.append(["final loss", f"{final['loss']:.4f} nats"])
        for key, what in (("knn", "kNN (k={k})"), ("knn_random_init", "kNN of the random initialisation")):
            if isinstance(final.get(key), dict):
                top5 = f", top-5 {final[key]['top5']:.2f}%" if "top5" in final[key] else ""  # none of 5 classes or fewer
                rows.append([what.format(k=final[key].get("k", cfg.get("knn_k"))), f"top-1 {final[key]['top1']:.2f}%{top5}"])
    else:  # a run stopped or still training: what metrics.jsonl holds so far
        logged = [r for r in records if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)]
        if logged:
            last = max(logged, key=lambda r: r["step"])
            epoch = last.get("epoch")  # a loss record's epoch: the one in progress, counted from 0
            where = f" (in epoch {epoch + 1} of {cfg.get('epochs')})" if isinstance(epoch, int) else ""
            rows.append(["logged so far", f"step {last['step']}{where}"])
            rows.append(["last logged loss", f"{last['loss']:.4f} nats"])
        knn_epochs, knn = series(records, "knn_top1", x="epoch")
        if len(knn):
            rows.append(["last kNN", f"top-1 {knn[-1]:.2f}% (epoch {knn_epochs[-1]:g})"])
    _, rate = series(records, "images_per_s")
    if len(rate):
        rows.append(["throughput", f"median {np.median(rate):.0f} images/s"])
    return rows


def make_report(
    run_dir: str | Path, data: str | None = None, dataset: str | None = None, embeddings: bool = True,
    device: str = "auto", batch_size: int = 512, workers: int = 4, max_points: int = 2000,
    n_queries: int = 8, n_neighbours: int = 6, say: Callable[[str], None] | None = None,
) -> Report:
    """Write ``run_dir/report.md`` and ``run_dir/report.html``; see the module docstring.

    ``data``/``dataset`` override the run's; ``embeddings=False`` skips the checkpoint-based plots
    (map and retrieval). Plots whose data is missing are left out with a note in the report.
    """
    try:
        return _make_report(run_dir, data, dataset, embeddings, device, batch_size, workers, max_points, n_queries,
                            n_neighbours, say)
    except OSError as err:  # the writes raise WriteError: this is a file of the run that cannot be read
        where = f"{err.filename}: " if err.filename else ""
        raise RunDirError(f"could not read the run in {run_dir}: {where}{err.strerror or err}; make it readable") from None


def _make_report(run_dir: str | Path, data: str | None, dataset: str | None, embeddings: bool, device: str, batch_size: int,
                 workers: int, max_points: int, n_queries: int, n_neighbours: int,
                 say: Callable[[str], None] | None) -> Report:
    """:func:`make_report`'s work; an ``OSError`` from it (a file it cannot read) becomes that function's one-line error."""
    import yaml

    run = Path(run_dir).expanduser()
    tell: Callable[[str], None] = say or (lambda message: None)
    if not run.is_dir():
        what = "is a file, not a directory" if run.exists() else "does not exist"
        raise RunDirError(f"run directory {run} {what}: pass the --out of ressl pretrain")
    if not (run / "config.yaml").is_file() and not (run / "metrics.jsonl").is_file():
        raise RunDirError(f"{run} is not a run directory (no config.yaml or metrics.jsonl): pass the --out of ressl pretrain")
    for place in (run, run / FILES_DIR):  # before minutes of embedding, not at the first plot
        if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
            raise RunDirError(f"{place} cannot be written (no write permission, or a read-only filesystem), and the report "
                              "goes there: copy the run directory somewhere writable and pass that")
    report = Report(run / "report.md", run / "report.html")
    cfg: dict[str, Any] = {}
    if (run / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((run / "config.yaml").read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            loaded = None
            report.notes.append(f"config.yaml could not be read ({type(err).__name__}): the configuration is left out")
        else:
            if not run_values(loaded) and not (run / "metrics.jsonl").is_file():  # another program's config.yaml
                raise RunDirError(f"{run} is not a run directory (its config.yaml is not a ressl run's, and it has no "
                                  "metrics.jsonl): pass the --out of ressl pretrain")
        cfg = loaded if isinstance(loaded, dict) else {}
    records = read_metrics(run / "metrics.jsonl")
    final = None
    if (run / "final.json").is_file():
        try:
            final = json.loads((run / "final.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # final stays None: noted below
        if not isinstance(final, dict):
            final = None
            report.notes.append("final.json could not be read: the final numbers are left out")
    files = run / FILES_DIR
    doc, plots = _Doc(), _Doc()

    doc.add("h1", f"ReSSL run report: {run.name}")
    doc.add("p", f"Run directory {run.resolve()}, report written {datetime.now().strftime('%Y-%m-%d %H:%M')}.")
    doc.add("h2", "Summary")
    if final is None and not (run / "final.json").is_file():
        report.notes.append("final.json is missing: the run has not finished (or was stopped); the numbers are those logged so far")
    try:
        summary = _summary_rows(cfg, final, records)
    except (TypeError, ValueError, AttributeError, KeyError):  # a hand-edited final.json or config.yaml
        report.notes.append("final.json or config.yaml holds values of the wrong kind: the summary shows the metrics log only")
        summary = _summary_rows({}, None, records)
    doc.add("table", [["", "value"], *summary])

    drawn: dict[str, Figure] = {}  # written at the end, with the pages that show them: an interrupted report mixes none

    def keep(name: str, fig: Figure) -> Path:
        drawn[name] = fig
        report.images[name] = files / f"{name}.png"
        return report.images[name]

    def add_plot(name: str, fig: Figure | None, caption: str, missing: str) -> None:
        if fig is None:
            report.notes.append(missing)
            return
        plots.add("img", (keep(name, fig), caption))

    embedded = _embed_run(run, data, dataset, device, batch_size, workers, report, tell) if embeddings else None
    add_plot("training", plot_training(records),
             "Top: the relational loss (nats) over optimiser steps. Bottom: the learning rate (cosine schedule) "
             "and the teacher's EMA momentum.", "no loss records in metrics.jsonl: training plot left out")
    add_plot("knn", plot_knn(records),
             "Weighted kNN accuracy of the student's frozen backbone on the test split, after each evaluated epoch "
             "(epoch 0: the random initialisation).", "no kNN records in metrics.jsonl (no labelled test split?): kNN plot left out")
    add_plot("health", plot_health(records, cfg.get("queue_size"), cfg.get("out_dim")),
             "Relation entropies: near log K the relation cannot tell queue entries apart (collapse); the teacher's "
             "(sharper temperature) should sit below the student's. Spread: 0 means every image maps to one point, "
             "1/sqrt(D) a uniform spread on the sphere.",
             f"no health signals ({', '.join(HEALTH_KEYS)}) in metrics.jsonl: entropy and spread plot left out")
    if embedded is not None:
        _map_plot(embedded, max_points, report, plots, keep, tell)
        _retrieval_plot(embedded, n_neighbours, n_queries, plots, keep)
    elif not embeddings:
        report.notes.append("embedding map and retrieval grid skipped (--no-embeddings)")

    doc.add("h2", "Plots")
    doc.blocks += plots.blocks
    if report.notes:
        doc.add("h2", "Left out")
        doc.add("ul", report.notes)
    doc.add("h2", "Configuration")
    doc.add("table", [["field", "value"], *[[k, _fmt(v)] for k, v in cfg.items()]])
    for name, fig in drawn.items():
        save_png(fig, report.images[name])
    with writing(f"the report in {run}", REPORT_WRITE_FIX):
        with replaced(report.markdown) as f:
            f.write(doc.to_markdown(run).encode("utf-8"))
        with replaced(report.html) as f:
            f.write(doc.to_html(f"ReSSL run report: {run.name}").encode("utf-8"))
        for name in PLOT_NAMES - set(report.images):  # an earlier report's plots that this one does not show
            (files / f"{name}.png").unlink(missing_ok=True)
    return report


@dataclass
class _Embedded:
    """Backbone features of a run's labelled training images (the gallery) and of its test images (the queries; the
    gallery itself when there is no test split), as the run's kNN checks compute them."""

    gallery: torch.Tensor  # (N, F)
    gallery_labels: torch.Tensor  # (N,)
    gallery_split: Split
    queries: torch.Tensor  # (M, F)
    query_labels: torch.Tensor  # (M,)
    query_split: Split
    names: list[str]  # class names
    kind: str  # what the queries are: "test" or "training"

    @property
    def labelled(self) -> bool:
        return bool((self.query_labels >= 0).all()) and bool((self.gallery_labels >= 0).all())


def _embed_run(run: Path, data: str | None, dataset: str | None, device: str, batch_size: int, workers: int,
               report: Report, say: Callable[[str], None]) -> _Embedded | None:
    """The run's checkpoint applied to its data (or ``data``/``dataset``); a missing checkpoint or run data set
    becomes a note and None, while data asked for with ``data``/``dataset`` that cannot be read is the command's error
    (nothing is written: the user's mistake must not replace an earlier, fuller report)."""
    from ressl.data import to_device
    from ressl.errors import CheckpointError
    from ressl.evaluate import checkpoint_features, load_for_evaluation

    try:
        dev = dist.resolve_device(device)
        backbone, run_cfg, ds = load_for_evaluation(str(run / "checkpoint.pt"), False, dev, dataset, data, download=False)
    except (CheckpointError, DataError) as err:
        if isinstance(err, DataError) and (data is not None or dataset is not None):
            raise
        report.notes.append(f"embedding map and retrieval grid left out: {err}")  # printed with the other notes
        return None
    gallery_split = ds.bank if ds.bank is not None else ds.train
    query_split = ds.test if ds.test is not None else gallery_split
    to_device(ds, dev, [gallery_split, query_split])
    say(f"ressl report: backbone features of {len(gallery_split)} + {len(query_split)} images ...")
    gallery, gallery_y = checkpoint_features(backbone, run_cfg, ds, gallery_split, dev, batch_size, workers, torch.float32)
    if query_split is gallery_split:
        queries, query_y = gallery, gallery_y
    else:
        queries, query_y = checkpoint_features(backbone, run_cfg, ds, query_split, dev, batch_size, workers, torch.float32)
    kind = "test" if query_split is ds.test else "training"
    return _Embedded(gallery, gallery_y.cpu(), gallery_split, queries, query_y.cpu(), query_split, class_names(ds), kind)


def _map_plot(e: _Embedded, max_points: int, report: Report, plots: _Doc, keep: Callable[[str, Figure], Path],
              say: Callable[[str], None]) -> None:
    """A 2-D map of up to ``max_points`` query embeddings, one colour per class (``keep(name, figure)``: its PNG)."""
    n = e.queries.shape[0]
    subset = np.sort(np.random.default_rng(0).choice(n, size=min(n, max_points), replace=False))
    if len(subset) < 5:
        report.notes.append(f"embedding map left out: only {progress.count(len(subset), 'image')}")
        return
    say(f"ressl report: 2-D map of {len(subset)} embeddings ...")
    points, method = project_2d(e.queries[torch.from_numpy(subset)].cpu().numpy())
    fig = plot_embedding_map(points, e.query_labels.numpy()[subset], e.names, method, f"{e.kind} embeddings")
    png = keep("embedding_map", fig)
    sampled = f" (a random subset of {n})" if len(subset) < n else ""
    plots.add("img", (png,
                      (f"{method} of the backbone features of {len(subset)} {e.kind} images{sampled}, one colour per class. "
                      "Classes that form separate islands are what the kNN and linear probes can read off."
                      if e.labelled else f"{method} of the backbone features of {len(subset)} unlabelled {e.kind} "
                      f"images{sampled}: groups of points are images the backbone holds alike.")))


def _retrieval_plot(e: _Embedded, n_neighbours: int, n_queries: int, plots: _Doc, keep: Callable[[str, Figure], Path]) -> None:
    """A grid of ``n_queries`` query images, each with its ``n_neighbours`` nearest gallery images."""
    same = e.query_split is e.gallery_split  # a query must not find itself
    sims, idx = nearest(e.gallery, e.queries, n_neighbours, exclude=torch.arange(e.queries.shape[0]) if same else None)
    qy, gy = e.query_labels, e.gallery_labels
    if e.labelled:
        precision = (gy[idx.cpu()] == qy[:, None]).float().mean().item() * 100
        plots.add("p", f"Across all {len(qy)} queries, {precision:.1f}% of the {idx.shape[1]} nearest training images "
                       "share the query's class.")
    chosen = pick_queries(qy.numpy(), n_queries)
    fig = plot_retrieval(
        [display_image(e.query_split, i) for i in chosen], [int(qy[i]) for i in chosen],
        [[display_image(e.gallery_split, int(j)) for j in idx[i]] for i in chosen],
        [[int(gy[int(j)]) for j in idx[i]] for i in chosen], [[float(s) for s in sims[i]] for i in chosen], e.names)
    plots.add("img", (keep("retrieval", fig),
                      (f"Each row: a {e.kind} image, then its {idx.shape[1]} nearest training images by cosine similarity "
                      "of the student's backbone features.")))


__all__ = ["Report", "class_names", "make_report", "nearest", "project_2d"]
