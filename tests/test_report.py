"""``ressl report`` and ``ressl embed`` on a short tiny run; the report's figures and helpers."""

import io
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_images
from PIL import Image

from ressl import config
from ressl.augment import eval_transform
from ressl.checkpoint import replaced
from ressl.cli import main
from ressl.data import Dataset, Split
from ressl.evaluate import load_trained
from ressl.folder import FolderIndex
from ressl.meter import read_metrics
from ressl.plots import plot_embedding_map, plot_health, plot_knn, plot_retrieval, plot_training
from ressl.report import class_names, nearest, pick_queries, project_2d

TINY = ["--image_size", "16", "--width", "8", "--hidden_dim", "32", "--out_dim", "16", "--batch_size", "32",
        "--queue_size", "64", "--knn_k", "10", "--precision", "fp32", "--workers", "0"]
EVERY_PLOT = ("training", "knn", "health", "embedding_map", "retrieval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, npz data directory) of a 2-epoch tiny run with kNN after every epoch."""
    data = tmp_path_factory.mktemp("npz")
    for part, n, seed in (("train", 128, 0), ("test", 64, 1)):
        x, y = make_images(n, 16, 4, seed=seed)
        np.savez(data / f"{part}.npz", x=x, y=y)
    run = tmp_path_factory.mktemp("runs") / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(data), "--out", str(run), "--epochs", "2", "--knn_every", "1",
            "--log_every", "2", "--device", "cpu", *TINY]
    assert main(argv) == 0
    return run, data


def copy_run(run: Path, dest: Path, health: bool) -> Path:
    """A copy of ``run`` whose loss records carry (health=True) or lack (False) the monitor's keys."""
    shutil.copytree(run, dest)
    records = read_metrics(dest / "metrics.jsonl")
    health_keys = ("teacher_entropy", "student_entropy", "student_std", "teacher_std", "queue_fill")
    for r in records:
        for key in health_keys:
            r.pop(key, None)
        if health and "loss" in r:
            s = r["step"]
            r.update(teacher_entropy=2.0 + 0.1 * s, student_entropy=3.0 + 0.05 * s, student_std=0.2 - 0.01 * s,
                     teacher_std=0.18 - 0.01 * s, queue_fill=min(1.0, s * 32 / 64))
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


def assert_real_png(path: Path) -> None:
    with Image.open(path) as im:
        im.load()
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, path
    assert pixels.std() > 10, f"{path} looks blank"


def test_a_run_directory_that_cannot_be_written_is_refused_before_any_work(trained, tmp_path, capsys, monkeypatch):
    """A run on a read-only filesystem (root's permissions ignore chmod, so the filesystem's answer is stood in for):
    one line at once, not after embedding every image."""
    from ressl import report

    run = copy_run(trained[0], tmp_path / "run", health=False)
    monkeypatch.setattr(report.os, "access", lambda path, mode: Path(path) != run)
    monkeypatch.setattr(report, "_embed_run", lambda *args: pytest.fail("embedded a run whose report cannot be written"))
    assert main(["report", str(run), "--workers", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{run} cannot be written (no write permission, or a read-only filesystem), and the report goes there: copy the run "
        "directory somewhere writable and pass that")
    assert not (run / "report_files").exists() and not (run / "report.md").exists()


def test_an_interrupted_report_leaves_the_earlier_one_whole(trained, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the 2-D map is computed (the slow part): the earlier report's pages and plots stay as they were,
    not new plots under the old pages (the run trained on since: its loss curve differs)."""
    from ressl import report

    run = copy_run(trained[0], tmp_path / "run", health=True)
    assert main(["report", str(run), "--workers", "0", "--device", "cpu"]) == 0
    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in [run / "report.md", run / "report.html", *(run / "report_files").iterdir()]}

    before = files()
    assert len(before) == 2 + len(EVERY_PLOT)
    with (run / "metrics.jsonl").open("a") as f:  # trained on since
        f.write(json.dumps({"step": 99, "epoch": 3, "loss": 0.5, "lr": 0.01, "momentum": 0.99}) + "\n")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "project_2d", interrupted)
    assert main(["report", str(run), "--workers", "0", "--device", "cpu"]) == 130
    assert files() == before


def test_report_writes_every_file_it_promises(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path / "run", health=True)
    assert main(["report", str(run), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    for name in EVERY_PLOT:
        png = run / "report_files" / f"{name}.png"
        assert_real_png(png)
        assert f"](report_files/{name}.png)" in md
    assert page.count("data:image/png;base64,") == len(EVERY_PLOT)
    assert "report_files/" not in page and "src=\"http" not in page  # one file, offline
    final = json.loads((run / "final.json").read_text())
    assert f"top-1 {final['knn']['top1']:.2f}%" in md and f"top-1 {final['knn']['top1']:.2f}%" in page
    assert "| queue_size | 64 |" in md and "left out" not in out


def test_without_health_keys_or_embeddings_the_report_says_what_it_left_out(trained, tmp_path):
    run = copy_run(trained[0], tmp_path / "run", health=False)
    assert main(["report", str(run), "--no-embeddings"]) == 0
    pngs = sorted(p.stem for p in (run / "report_files").glob("*.png"))
    assert pngs == ["knn", "training"]
    md = (run / "report.md").read_text()
    assert "no health signals" in md and "--no-embeddings" in md
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 2


def test_unavailable_run_data_gives_a_report_without_the_embedding_plots(trained, tmp_path, capsys):
    """The run's own data moved away: the report is written without the plots that need it (an earlier report's
    copies of them removed), and says why."""
    run = copy_run(trained[0], tmp_path / "run", health=False)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    saved["config"]["data"] = str(tmp_path / "moved")
    torch.save(saved, run / "checkpoint.pt")
    (run / "report_files").mkdir()
    (run / "report_files" / "retrieval.png").write_bytes(b"an earlier report's grid")
    assert main(["report", str(run), "--device", "cpu"]) == 0
    md = (run / "report.md").read_text()
    assert "embedding map and retrieval grid left out" in md and "does not exist" in md
    assert (run / "report_files" / "training.png").is_file()
    assert not (run / "report_files" / "embedding_map.png").exists() and not (run / "report_files" / "retrieval.png").exists()
    out = capsys.readouterr().out
    assert "  note: embedding map and retrieval grid left out: data directory" in out and "left out: embedding" not in out


def test_data_asked_for_that_cannot_be_read_is_an_error_that_keeps_the_earlier_report(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path / "run", health=False)
    (run / "report.md").write_text("an earlier, fuller report")
    assert main(["report", str(run), "--data", str(tmp_path / "typo"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "typo does not exist" in err
    assert (run / "report.md").read_text() == "an earlier, fuller report" and not (run / "report_files").exists()


def test_the_report_of_an_unfinished_run_shows_what_it_logged_so_far(trained, tmp_path):
    run = copy_run(trained[0], tmp_path / "run", health=False)
    (run / "final.json").unlink()  # stopped (or still training)
    records = read_metrics(run / "metrics.jsonl")
    last_loss = [r for r in records if "loss" in r][-1]
    last_knn = [r for r in records if "knn_top1" in r][-1]
    assert main(["report", str(run), "--no-embeddings"]) == 0
    md = (run / "report.md").read_text()
    assert f"| logged so far | step {last_loss['step']} (in epoch {last_loss['epoch'] + 1} of " in md
    assert f"| last logged loss | {last_loss['loss']:.4f} nats |" in md
    assert f"| last kNN | top-1 {last_knn['knn_top1']:.2f}% (epoch {last_knn['epoch']:g}) |" in md
    assert "final.json is missing" in md


def test_retrieval_of_unlabelled_images_promises_no_class_colours():
    image = np.zeros((8, 8, 3), np.uint8)
    titles = [plot_retrieval([image], [q], [[image]], [[q]], [[0.5]], ["a"])._suptitle.get_text() for q in (0, -1)]
    assert titles[0].endswith("green: same class, red: another") and "unlabelled" in titles[1] and "green" not in titles[1]


def test_report_on_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["report", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("foo: 1\n")  # another program's: no report is written into its directory
    assert main(["report", str(tmp_path)]) == 2
    assert "its config.yaml is not a ressl run's" in capsys.readouterr().err and not (tmp_path / "report.md").exists()
    (tmp_path / "config.yaml").write_text("")  # an empty one is no run's either
    assert main(["report", str(tmp_path)]) == 2
    assert "its config.yaml is not a ressl run's" in capsys.readouterr().err and not (tmp_path / "report.md").exists()
    damaged = tmp_path / "damaged"  # a run's config.yaml that cannot be read is a note, whatever else the run holds
    damaged.mkdir()
    (damaged / "config.yaml").write_text("a: [unclosed")
    assert main(["report", str(damaged), "--no-embeddings"]) == 0
    assert "config.yaml could not be read" in capsys.readouterr().out


def test_a_runs_config_alone_or_its_log_beside_another_config_is_reported(tmp_path, capsys):
    """Only a directory with neither a run's config.yaml nor a metrics.jsonl is refused: a run stopped before its
    first record (its config.yaml alone) gets its report, as does a run's log beside a config.yaml of other keys."""
    started, logged = tmp_path / "started", tmp_path / "logged"
    started.mkdir()
    config.save(config.resolve(None, {}), started / "config.yaml")
    assert main(["report", str(started), "--no-embeddings"]) == 0
    logged.mkdir()
    (logged / "config.yaml").write_text("foo: 1\n")
    (logged / "metrics.jsonl").write_text('{"step": 0, "epoch": 0}\n')
    assert main(["report", str(logged), "--no-embeddings"]) == 0
    assert (started / "report.md").is_file() and (logged / "report.md").is_file()


def test_figures_plot_the_logged_values(trained):
    records = read_metrics(trained[0] / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig = plot_training(records)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [s for s, _ in loss] and list(line.get_ydata()) == [v for _, v in loss]
    knn = sorted((r["epoch"], r["knn_top1"]) for r in records if "knn_top1" in r)
    assert [e for e, _ in knn] == [0, 1, 2]  # random init, after epoch 1, final
    assert list(plot_knn(records).axes[0].lines[0].get_ydata()) == [v for _, v in knn]
    health_keys = ("teacher_entropy", "student_entropy", "student_std", "teacher_std", "queue_fill")
    assert plot_health([{k: v for k, v in r.items() if k not in health_keys} for r in records], 64, 16) is None
    fake = [{"step": s, "teacher_entropy": 1.0 + s, "student_std": 0.1} for s in range(3)]
    ax_entropy, ax_spread = plot_health(fake, 64, 16).axes[:2]
    assert list(ax_entropy.lines[0].get_ydata()) == [1.0, 2.0, 3.0]
    assert ax_entropy.lines[-1].get_ydata()[0] == pytest.approx(np.log(64))  # the log K reference
    assert ax_spread.lines[-1].get_ydata()[0] == pytest.approx(0.25)  # 1/sqrt(16)


def test_class_names_and_the_map_legend():
    def ds(name, n, folder=None):
        return Dataset(name, Split(folder=folder) if folder else Split(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)), None, None,
                       n, (0.5,) * 3, (0.5,) * 3)

    assert class_names(ds("cifar10", 10))[:3] == ["airplane", "automobile", "bird"]
    assert class_names(ds("npz", 3)) == ["0", "1", "2"]
    assert class_names(ds("folder", 2, FolderIndex([Path("a/x.png")], [0], ["cat", "dog"]))) == ["cat", "dog"]
    points, labels = np.random.default_rng(0).normal(size=(30, 2)), np.arange(30) % 3
    fig = plot_embedding_map(points, labels, ["cat", "dog", "emu"], "t-SNE", "test embeddings")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog", "emu"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30


def test_nearest_matches_brute_force_and_excludes_self():
    gallery, queries = torch.randn(40, 6), torch.randn(9, 6)
    sims, idx = nearest(gallery, queries, 4, chunk_size=2)
    brute = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    expected = brute.topk(4, dim=1)
    torch.testing.assert_close(sims, expected.values)
    assert torch.equal(idx, expected.indices)
    sims, idx = nearest(gallery, gallery, 3, exclude=torch.arange(40))
    assert not (idx == torch.arange(40)[:, None]).any() and sims.shape == (40, 3)


def test_pick_queries_spreads_over_classes():
    labels = np.array([0] * 20 + [1] * 3 + [2] * 2)
    chosen = pick_queries(labels, 5)
    assert len(set(chosen)) == 5 and set(labels[chosen[:3]]) == {0, 1, 2}


def test_project_2d_uses_umap_when_importable(monkeypatch):
    x = np.random.default_rng(0).normal(size=(40, 8))
    points, method = project_2d(x)
    assert method == "t-SNE" and points.shape == (40, 2) and np.isfinite(points).all()

    class FakeUMAP:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, data):
            assert np.allclose(np.linalg.norm(data, axis=1), 1)  # features are unit-normalised first
            return data[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    points, method = project_2d(x)
    assert method == "UMAP" and points.shape == (40, 2)


def direct_features(checkpoint: Path, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Backbone features of uint8 images (B, C, H, W), without ressl.data's batching."""
    backbone, cfg, _ = load_trained(str(checkpoint))
    with torch.no_grad():
        return backbone(eval_transform(images, cfg.image_size, mean, std))


def test_embed_in_memory_split_rows_in_order(trained, tmp_path):
    run, data = trained
    out = tmp_path / "emb.npy"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--split", "test",  # the run's own data, as knn reads
                 "--out", str(out), "--device", "cpu", "--batch_size", "24"]) == 0
    features = np.load(out)
    rows = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert features.dtype == np.float32 and features.shape == (64, 64)  # resnet18 width 8: 8 * 8 features
    assert rows == [f"test:{i}" for i in range(64)]
    with np.load(data / "test.npz") as f:
        x = torch.from_numpy(f["x"]).permute(0, 3, 1, 2)
    with np.load(data / "train.npz") as f:  # npz statistics come from the training images
        train = torch.from_numpy(f["x"]).permute(0, 3, 1, 2).float() / 255
    mean, std = train.mean(dim=(0, 2, 3)).tolist(), train.std(dim=(0, 2, 3)).tolist()
    pick = [0, 5, 31, 63]
    expected = direct_features(run / "checkpoint.pt", x[pick], mean, std)
    np.testing.assert_allclose(features[pick], expected.numpy(), rtol=1e-3, atol=1e-4)
    assert not np.allclose(features[0], features[1])  # rows differ: a shuffled order would be caught


def test_embed_that_cannot_write_keeps_the_earlier_features(trained, tmp_path, monkeypatch, capsys):
    run, _ = trained
    out = tmp_path / "emb.npy"
    np.save(out, np.ones((2, 3), np.float32))

    def disk_full_midway(f, array):
        f.write(b"\x93NUMPY half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ressl.embed.np.save", disk_full_midway)
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--device", "cpu"]) == 1
    assert "No space left on device; free disk space or choose another --out" in capsys.readouterr().err
    assert np.array_equal(np.load(out), np.ones((2, 3), np.float32)) and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]
    monkeypatch.undo()
    (tmp_path / "emb.files.txt").write_text("the earlier rows\n")
    opened = []

    def rows_fail(path, sync=False):  # the features are written, then the row list fails: neither is replaced
        opened.append(path)
        if str(path).endswith(".files.txt"):
            raise OSError(28, "No space left on device")
        return replaced(path, sync)

    monkeypatch.setattr("ressl.embed.replaced", rows_fail)
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--device", "cpu"]) == 1
    assert np.array_equal(np.load(out), np.ones((2, 3), np.float32)) and len(opened) == 2
    assert (tmp_path / "emb.files.txt").read_text() == "the earlier rows\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.files.txt", "emb.npy"]
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "emb")]) == 2
    assert "name the features file with .npy, e.g. --out " + str(tmp_path / "emb.npy") in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # the row list still fails: the error names --out as the user typed it
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", "~/emb.npy", "--device", "cpu"]) == 1
    assert "could not write --out ~/emb.npy: No space left on device" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes but / and NUL, as on Linux")
def test_embed_names_every_file_on_its_own_line_whatever_its_name(trained, tmp_path):
    run, _ = trained
    x, _ = make_images(3, 16, 1)
    root = tmp_path / "odd"
    root.mkdir()
    names = [b"a\nb.png", b"caf\xe9.png", b"plain.png"]  # a newline; Latin-1, not UTF-8
    for name, image in zip(names, x):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(buffer.getvalue())
    out = tmp_path / "f.npy"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(root), "--dataset", "folder",
                 "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    lines = (tmp_path / "f.files.txt").read_bytes().split(b"\n")[:-1]
    assert np.load(out).shape[0] == len(lines) == 3
    assert sorted(line.rsplit(b"/", 1)[1] for line in lines) == [b"a\\nb.png", b"caf\xe9.png", b"plain.png"]


def test_embed_image_folder_rows_follow_files_txt(trained, tmp_path, capsys):
    run, _ = trained
    x, y = make_images(12, 16, 3, seed=2)
    root = tmp_path / "pictures"
    for i, (img, c) in enumerate(zip(x, y)):
        folder = root / ["zebra", "ant", "moth"][c]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{11 - i:02d}.png")  # lossless, names not in creation order
    out = tmp_path / "feats.npy"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(root), "--dataset", "folder",
                 "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    features = np.load(out)
    files = [Path(p) for p in (tmp_path / "feats.files.txt").read_text().splitlines()]
    assert features.shape == (12, 64) and len(files) == 12 and all(p.is_file() for p in files)
    assert [p.parent.name for p in files] == ["ant"] * 4 + ["moth"] * 4 + ["zebra"] * 4
    from ressl.data import STATS

    # normalised as the run's own training images were (its npz arrays' statistics), not as a folder's (ImageNet's)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["normalisation"]
    assert saved["mean"] != list(STATS["imagenet"][0])
    for i in (0, 5, 11):
        image = torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)[None]
        expected = direct_features(run / "checkpoint.pt", image, saved["mean"], saved["std"])
        np.testing.assert_allclose(features[i], expected[0].numpy(), rtol=1e-3, atol=1e-4)
    # no test split in a plain folder: a one-line error
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(root), "--dataset", "folder",
                 "--split", "test", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--split train" in err


def test_damaged_or_unwritable_run_files_give_notes_or_one_line_errors(tmp_path):
    """A hand-broken config.yaml or final.json becomes a note; a report that cannot be written, a WriteError."""
    from ressl.errors import WriteError
    from ressl.report import make_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 8.0, "lr": 0.1, "ema_momentum": 0.99}\n')
    (run / "config.yaml").write_text("a: [unclosed")
    (run / "final.json").write_text("[1, 2]")
    report = make_report(run, embeddings=False)
    assert any("config.yaml could not be read" in n for n in report.notes)
    assert any("final.json could not be read" in n for n in report.notes)
    (run / "final.json").write_text('{"loss": "bad", "knn": 3}')
    make_report(run, embeddings=False)  # values of the wrong kind: a note, not a traceback
    (run / "report.md").unlink()
    (run / "report.md").mkdir()
    with pytest.raises(WriteError, match="could not write the report in .*; make the run directory writable"):
        make_report(run, embeddings=False)
