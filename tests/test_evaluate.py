import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ressl.evaluate import knn_accuracy, knn_scores, linear_probe, topk_accuracy


def naive_knn(bank, bank_labels, queries, num_classes, k, t):
    """Weighted kNN one query at a time, from the definition."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    out = torch.zeros(len(queries), num_classes)
    for i, q in enumerate(queries):
        sims = [(float(q @ b), int(y)) for b, y in zip(bank, bank_labels)]
        sims.sort(key=lambda s: -s[0])
        for sim, y in sims[:k]:
            out[i, y] += torch.tensor(sim / t).exp()
    return out


def test_knn_matches_naive_reference_and_chunking_changes_nothing():
    bank, labels, queries = torch.randn(60, 5), torch.randint(0, 3, (60,)), torch.randn(17, 5)
    expected = naive_knn(bank, labels, queries, 3, k=7, t=0.1)
    torch.testing.assert_close(knn_scores(bank, labels, queries, 3, k=7, temperature=0.1), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(knn_scores(bank, labels, queries, 3, k=7, temperature=0.1, chunk_size=4), expected, rtol=1e-4, atol=1e-4)


def test_knn_on_separable_clusters_and_k_larger_than_bank():
    centres = F.normalize(torch.randn(4, 16), dim=1) * 5
    labels = torch.arange(40) % 4
    bank = centres[labels] + 0.1 * torch.randn(40, 16)
    queries = centres[labels[:12]] + 0.1 * torch.randn(12, 16)
    acc = knn_accuracy(bank, labels, queries, labels[:12], 4, k=200)
    assert acc["top1"] == 100.0


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top2"] == pytest.approx(200 / 3)
    # a top-k of k >= the classes is always 100%: left out; a share of whole images is printed without float noise
    assert set(topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 3))) == {"top1"}
    assert topk_accuracy(torch.eye(10)[[0] + [1] * 9], torch.zeros(10, dtype=torch.long))["top1"] == 10.0
    assert math.isnan(topk_accuracy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))["top1"])  # no rows


def test_linear_probe_learns_a_linear_rule():
    x = torch.randn(400, 10)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    acc = linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=2, epochs=20, lr=0.1, batch_size=64)
    assert acc["top1"] > 90


def test_linear_probe_with_fresh_batches_each_epoch():
    x = torch.randn(400, 10)
    y = (x[:, 0] - x[:, 2] > 0).long()
    seen = []

    def batches(epoch):
        seen.append(epoch)
        noisy = x[:300] + 0.05 * torch.randn(300, 10)  # a new "augmented" view every epoch
        for start in range(0, 300, 64):
            yield noisy[start : start + 64], y[:300][start : start + 64]

    acc = linear_probe(x[:300], y[:300], x[300:], y[300:], 2, epochs=15, lr=0.1, batch_size=64, train_batches=batches)
    assert seen == list(range(15)) and acc["top1"] > 90


@pytest.mark.parametrize("given", [512, 100, 64])
def test_linear_probe_takes_sgd_steps_of_its_batch_size_and_ends_its_schedule_whatever_batches_it_is_given(given, monkeypatch):
    """``ressl linear --augment`` embeds ``--batch_size`` images per forward pass (512, or 100), the probe's SGD batch
    is its own (256): the learning rate still decays to about 0 by the last step, as on the cached features."""
    import ressl.evaluate

    x, y = torch.randn(1000, 4), torch.randint(0, 2, (1000,))
    rates, sizes = [], []
    schedule, cross_entropy = ressl.evaluate.cosine_lr, F.cross_entropy
    monkeypatch.setattr(ressl.evaluate, "cosine_lr", lambda *a: rates.append(schedule(*a)) or rates[-1])
    monkeypatch.setattr(F, "cross_entropy", lambda logits, t: sizes.append(len(t)) or cross_entropy(logits, t))

    def batches(epoch):
        for start in range(0, 1000, given):
            yield x[start : start + given], y[start : start + given]

    linear_probe(x, y, x[:10], y[:10], 2, epochs=3, lr=0.4, batch_size=256, train_batches=batches)
    assert sizes == [256, 256, 256, 232] * 3  # batches of 256 whatever was given, the epoch's rest last
    assert rates[0] == pytest.approx(0.4) and rates[-1] < 0.4 * 0.02  # at the start of the last step
    assert sum(sizes) == 3000 and all(a >= b for a, b in itertools.pairwise(rates))


def test_linear_probe_is_a_function_of_its_seed():
    """The classifier starts from the seed, not from the global generator: one checkpoint, one accuracy."""
    x = torch.randn(200, 10)
    y = (x[:, 0] + 0.3 * torch.randn(200) > 0).long()
    runs = []
    for noise in range(3):
        torch.manual_seed(noise)  # whatever ran before
        runs.append(linear_probe(x[:150], y[:150], x[150:], y[150:], 2, epochs=1, lr=1e-3, batch_size=32, seed=1))
    assert runs[0] == runs[1] == runs[2]


def test_augmented_batches_of_a_folder_without_workers_are_drawn_from_the_seed(tmp_path):
    """``linear --augment --workers 0`` on an image folder: the crops come from the seed, not from whatever the global
    generator holds, so one checkpoint gives one accuracy."""
    from PIL import Image

    from ressl.data import Split
    from ressl.evaluate import augmented_batches
    from ressl.folder import scan_folder

    for i in range(6):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / str(i % 2) / f"{i}.png")
    split = Split(folder=scan_folder(tmp_path))
    common = dict(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=6, device=torch.device("cpu"), dtype=None, workers=0)

    def epoch_features(noise: int, epoch: int = 0) -> torch.Tensor:
        torch.manual_seed(noise)  # whatever ran before
        return torch.cat([f for f, _ in augmented_batches(torch.nn.Flatten(), split, **common)(epoch)])

    assert torch.equal(epoch_features(1), epoch_features(2)) and not torch.equal(epoch_features(1), epoch_features(1, epoch=1))


def test_augmented_batches_follow_the_runs_crop_scale_and_flip():
    """A run without flips is probed without flips; crops of the whole image (scale 1) leave it as it is."""
    from ressl.data import Split
    from ressl.evaluate import augmented_batches

    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.zeros(8, dtype=torch.long))
    identity = torch.nn.Flatten()
    common = dict(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch_size=8, device=torch.device("cpu"), dtype=None)

    def epoch_features(**kw):
        return torch.cat([f for f, _ in augmented_batches(identity, split, crop_min_scale=1.0, **common, **kw)(0)])

    plain = torch.sort(images.float().div(255).flatten(1), dim=0).values
    assert torch.allclose(torch.sort(epoch_features(flip=False), dim=0).values, plain, atol=1e-5)
    assert not torch.allclose(torch.sort(epoch_features(flip=True), dim=0).values, plain, atol=1e-5)


def test_accuracy_text_leaves_out_a_top5_that_is_always_100():
    from ressl.evaluate import accuracy_text

    assert accuracy_text({"top1": 81.234, "top5": 99.5}, 10) == "top-1 81.23%  top-5 99.50%"
    assert accuracy_text({"top1": 90.0}, 3) == "top-1 90.00%  (3 classes: no top-5)"
    assert accuracy_text({"top1": 100.0}, 1).startswith("top-1 100.00%  (1 class: every guess is right, so this says nothing")


def test_knn_of_a_checkpoint_reports_the_k_it_used(npz_dir, tmp_path):
    """``ressl knn --k 100000`` on a bank of 128 images votes with all 128: the result says k 128, and ``say`` tells why."""
    from ressl import config
    from ressl.evaluate import evaluate_checkpoint
    from ressl.model import model_from_config

    cfg = config.resolve(None, {"dataset": "npz", "data": str(npz_dir), "image_size": 16, "width": 8, "hidden_dim": 32,
                                "out_dim": 16, "batch_size": 32, "queue_size": 64, "precision": "fp32", "workers": 0})
    model = model_from_config(cfg)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    said: list[str] = []
    common = dict(device="cpu", workers=0, temperature=0.1)
    result = evaluate_checkpoint(str(path), "knn", k=100_000, say=said.append, **common)
    assert result == evaluate_checkpoint(str(path), "knn", k=128, **common) and result["k"] == 128
    assert said[-1] == "k 100,000 is more than the 128 images of the bank: every one is a neighbour (k 128)"
    quiet: list[str] = []
    assert evaluate_checkpoint(str(path), "knn", k=5, say=quiet.append, **common)["k"] == 5 and len(quiet) == 1
    # the vote temperature (--temperature) reaches the vote: nearly the nearest alone at 0.01, nearly a count at 100
    sharp, flat = (evaluate_checkpoint(str(path), "knn", k=128, device="cpu", workers=0, temperature=t) for t in (0.01, 100.0))
    assert (sharp["temperature"], flat["temperature"]) == (0.01, 100.0) and sharp["top1"] != flat["top1"]


def _features_on_many_scales() -> tuple[torch.Tensor, torch.Tensor]:
    """600 two-class points whose 10 features lie on scales from 0.01 to 100, all offset by 50."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 10, generator=g)
    y = (z[:, 0] + 0.5 * z[:, 1] > 0).long()
    return z * torch.logspace(-2, 2, 10)[torch.randperm(10, generator=g)] + 50.0, y


def test_linear_probe_standardises_every_split_with_the_training_statistics():
    """Unstandardised, SGD cannot fit features this far apart in scale; standardised with the test split's own
    statistics, a test split of one class (its mean off the training mean) would be shifted onto the other."""
    x, y = _features_on_many_scales()
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    assert linear_probe(train_x, train_y, test_x, test_y, 2, epochs=20, batch_size=64)["top1"] > 90
    ones = test_y == 1
    assert linear_probe(train_x, train_y, test_x[ones], test_y[ones], 2, epochs=20, batch_size=64)["top1"] > 90


def test_linear_probe_hands_its_weight_decay_and_momentum_to_sgd(monkeypatch):
    """(Observed: decay shrinks the weights but hardly moves a linear probe's argmax, so accuracy cannot show it.)"""
    made, real = [], torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda *args, **kwargs: made.append(kwargs) or real(*args, **kwargs))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    linear_probe(x, y, x, y, 2, epochs=1, batch_size=8, weight_decay=0.3)
    assert [(kw["weight_decay"], kw["momentum"]) for kw in made] == [(0.3, 0.9)]


def test_linear_probe_shuffles_its_training_set_anew_each_epoch(monkeypatch):
    """On images sorted by class every batch of 64 holds both classes, in another order the second epoch (the loss's
    targets observed; the real loss still computed)."""
    targets, real = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, t: targets.append(t.clone()) or real(logits, t))
    x, y = torch.randn(256, 3), torch.arange(256) // 128
    linear_probe(x, y, x, y, 2, epochs=2, batch_size=64)
    assert len(targets) == 8 and all(0 < int(t.sum()) < len(t) for t in targets)
    assert not torch.equal(torch.cat(targets[:4]), torch.cat(targets[4:]))


def test_knn_and_probe_features_let_another_image_stand_in_for_one_broken_since_the_scan(tmp_path):
    """A file that breaks during a long command (a training run's final kNN): the kNN and the linear probe count
    labels, so the next readable image takes its row, with its label and a warning; ``embed``'s rows name their
    files, so it stops there instead."""
    from PIL import Image

    from ressl.data import Split
    from ressl.errors import DataError, DataWarning
    from ressl.evaluate import split_features
    from ressl.folder import scan_folder

    for i in range(4):
        (tmp_path / f"c{i // 2}").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"c{i // 2}" / f"{i}.png")
    split = Split(folder=scan_folder(tmp_path), max_bad_fraction=0.5)
    split.folder.files[1].write_bytes(b"broken since the scan")
    common = dict(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=4, device=torch.device("cpu"), dtype=None,
                  workers=0, store_dtype=torch.float32)
    with pytest.raises(DataError, match="1.png could not be decoded"):
        split_features(torch.nn.Flatten(), split, **common)
    with pytest.warns(DataWarning, match="could not decode .*1.png; it is replaced by another sample"):
        features, labels = split_features(torch.nn.Flatten(), split, **common, stand_in=True)
    assert labels.tolist() == [0, 1, 1, 1] and torch.equal(features[1], features[2])  # image 2 in row 1, with its label


def test_knn_features_pass_over_a_file_that_training_found_broken_without_a_new_warning(tmp_path):
    """The run's kNN checks embed splits whose record training keeps (``Split.failure_record``): a file that training
    found broken gets the next readable image in its row, as in training, and no warning at every check."""
    import warnings

    from PIL import Image

    from ressl.data import Split
    from ressl.errors import DataWarning
    from ressl.evaluate import split_features
    from ressl.folder import scan_folder

    for i in range(4):
        (tmp_path / f"c{i // 2}").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"c{i // 2}" / f"{i}.png")
    split = Split(folder=scan_folder(tmp_path), max_bad_fraction=0.5)
    split.folder.files[1].write_bytes(b"broken since the scan")
    split.failure_record()[1] = 1  # training met it
    common = dict(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=4, device=torch.device("cpu"), dtype=None,
                  workers=0, store_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        features, labels = split_features(torch.nn.Flatten(), split, **common, stand_in=True)
    assert labels.tolist() == [0, 1, 1, 1] and torch.equal(features[1], features[2])


def test_augmented_batches_of_a_folder_warn_about_a_broken_file_once_not_every_epoch(tmp_path):
    """``linear --augment`` makes a dataset per epoch from one split: the split's record carries a file found broken
    in one epoch to the next, which passes over it without a second warning."""
    import warnings

    from PIL import Image

    from ressl.data import Split
    from ressl.errors import DataWarning
    from ressl.evaluate import augmented_batches
    from ressl.folder import scan_folder

    for i in range(4):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / str(i % 2) / f"{i}.png")
    split = Split(folder=scan_folder(tmp_path), max_bad_fraction=0.5)
    broken = split.folder.files[1]
    broken.write_bytes(b"broken since the scan")
    epochs = augmented_batches(torch.nn.Flatten(), split, image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=2,
                               device=torch.device("cpu"), dtype=None, workers=0)
    said = []
    for epoch in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert sum(len(y) for _, y in epochs(epoch)) == 4
        said.append([str(w.message) for w in seen if issubclass(w.category, DataWarning)])
    assert len(said[0]) == 1 and broken.name in said[0][0] and said[1] == []
    assert split.failure_record().tolist() == [0, 1, 0, 0]


def test_knn_of_a_checkpoint_lets_another_image_stand_in_for_one_broken_since_the_scan(tmp_path):
    """``ressl knn`` (and ``linear``) on a folder whose images break after the scan, in the bank and in the test
    split: each row counts by its label, so the next readable image takes it, with a warning, and the command ends
    with a result instead of stopping (as ``embed``, whose rows name their files, does)."""
    from PIL import Image

    from ressl import config
    from ressl.errors import DataWarning
    from ressl.evaluate import evaluate_checkpoint
    from ressl.model import model_from_config

    root = tmp_path / "photos"
    for part in ("train", "val"):
        for i in range(4):
            (root / part / f"c{i // 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (60 * i, 30 * i, 0)).save(root / part / f"c{i // 2}" / f"{i}.png")
    cfg = config.resolve(None, {"dataset": "folder", "data": str(root), "image_size": 16, "width": 8, "hidden_dim": 32,
                                "out_dim": 16, "batch_size": 4, "queue_size": 8, "precision": "fp32", "workers": 0,
                                "max_bad_fraction": 0.5})
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model_from_config(cfg).state_dict(), "config": cfg.to_dict()}, path)

    def break_files(_message: str) -> None:  # told before the features: the folder has been scanned
        for part in ("train", "val"):
            (root / part / "c0" / "1.png").write_bytes(b"broken since the scan")

    with pytest.warns(DataWarning, match="could not decode .*1.png; it is replaced by another sample"):
        result = evaluate_checkpoint(str(path), "knn", device="cpu", workers=0, k=3, temperature=0.1, say=break_files)
    assert result["classes"] == 2 and result["k"] == 3
