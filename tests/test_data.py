import numpy as np
import pytest
import torch
from PIL import Image

from ressl.data import DataError, eval_batches, load_dataset, pretrain_batches


def test_digits_embedded():
    ds = load_dataset("digits", None)
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    assert len(ds.train) + len(ds.test) == 1797 and ds.num_classes == 10
    assert int(ds.train.images.max()) == 255


def test_npz_directory(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    assert ds.train.images.shape == (128, 3, 16, 16) and ds.test.images.shape == (64, 3, 16, 16)
    assert ds.num_classes == 4 and ds.bank is ds.train
    assert len(ds.mean) == 3 and all(0 < s < 1 for s in ds.std)


def test_pretrain_batches_cover_an_epoch_without_repeats(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    ds.train.images[:, 0, 0, 0] = torch.arange(128, dtype=torch.uint8)  # tag each image
    seen = []
    for weak, strong in pretrain_batches(ds, 32, 16, 0.2, 0, torch.randperm(128), 0, torch.device("cpu")):
        assert weak.shape == (32, 3, 16, 16) and weak.dtype == torch.uint8
        seen += weak[:, 0, 0, 0].tolist()
    assert sorted(seen) == list(range(128))


def test_eval_batches_in_order(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    labels = torch.cat([y for _, y in eval_batches(ds.test, 16, ds.mean, ds.std, 20, torch.device("cpu"))])
    assert torch.equal(labels, ds.test.labels)


def test_image_folder_with_train_and_val(tmp_path):
    for split, n in (("train", 6), ("val", 3)):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 24), colour).save(d / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path))
    assert len(ds.train) == 12 and len(ds.test) == 6 and ds.num_classes == 2
    batches = list(pretrain_batches(ds, 4, 16, 0.2, 0, torch.randperm(12), 0, torch.device("cpu")))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 16, 16)
    x, y = next(eval_batches(ds.test, 16, ds.mean, ds.std, 8, torch.device("cpu"), workers=0))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("dataset,make,match", [
    ("npz", lambda p: p / "missing", "does not exist"),
    ("cifar10", lambda p: p / "missing", "does not exist"),
    ("folder", lambda p: p, "no images"),
    ("cifar10", None, "needs --data"),
])
def test_bad_data_is_a_one_line_error(tmp_path, dataset, make, match):
    with pytest.raises(DataError, match=match) as err:
        load_dataset(dataset, None if make is None else str(make(tmp_path)))
    assert "\n" not in str(err.value)


def test_npz_with_wrong_dtype(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 8, 8, 3), dtype=np.float32), y=np.zeros(4))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", str(tmp_path))


def test_pretrain_batches_resume_mid_epoch(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    order = torch.randperm(128)
    full = [w for w, _ in pretrain_batches(ds, 32, 16, 0.2, 0, order, 0, torch.device("cpu"))]
    rest = [w for w, _ in pretrain_batches(ds, 32, 16, 0.2, 0, order, 2, torch.device("cpu"))]
    assert len(full) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))


def test_sample_split_is_fixed_and_keeps_labels(npz_dir):
    from ressl.data import sample_split

    ds = load_dataset("npz", str(npz_dir))
    a, b = sample_split(ds.train, 50), sample_split(ds.train, 50)
    assert len(a) == 50 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    rows = {tuple(img.flatten().tolist()): int(y) for img, y in zip(ds.train.images, ds.train.labels)}
    assert all(rows[tuple(img.flatten().tolist())] == int(y) for img, y in zip(a.images, a.labels))
    assert sample_split(ds.train, 1000) is ds.train


def test_download_is_asked_for_and_never_implicit(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:  # stands in for the network: records what torchvision would be asked
        def __init__(self, root, download, train):
            calls.append((root, download))
            self.data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    target = tmp_path / "new" / "cifar10"
    ds = load_dataset("cifar10", str(target), download=True)
    assert target.is_dir() and len(ds.train) == 4 and all(d for _, d in calls)
    calls.clear()
    load_dataset("cifar10", str(target))
    assert calls and not any(d for _, d in calls)


def test_torchvision_backend_batches_are_finished_per_image_views(npz_dir):
    """augment_backend torchvision: workers hand over normalised float (weak, strong) pairs, one epoch's
    images exactly once, each view cut on its own (the official loader's design)."""
    from ressl.augment import torchvision_pipeline
    from ressl.data import TwoViews

    ds = load_dataset("npz", str(npz_dir))
    kw = dict(mean=ds.mean, std=ds.std, crop_scale=(0.2, 1.0))
    views = TwoViews(torchvision_pipeline(16, strong=False, **kw), torchvision_pipeline(16, strong=True, **kw))
    batches = list(pretrain_batches(ds, 32, 16, 0.2, 0, torch.randperm(128), 1, torch.device("cpu"), views))
    assert len(batches) == 3  # from batch 1 on
    weak, strong = batches[0]
    assert weak.shape == strong.shape == (32, 3, 16, 16) and weak.dtype == torch.float32
    assert weak.min() < -0.5 and weak.max() > 0.5  # normalised, not 0..255
    assert not torch.equal(weak, strong)


def test_torchvision_backend_on_a_folder(tmp_path):
    from ressl.augment import torchvision_pipeline
    from ressl.data import TwoViews

    for i in range(8):
        Image.new("RGB", (20 + i, 24), (40 * i, 0, 200)).save(tmp_path / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path))
    pipe = torchvision_pipeline(16, strong=True, mean=ds.mean, std=ds.std)
    batches = list(pretrain_batches(ds, 4, 16, 0.2, 0, torch.randperm(8), 0, torch.device("cpu"), TwoViews(pipe, pipe)))
    assert len(batches) == 2 and batches[0][1].shape == (4, 3, 16, 16) and batches[0][1].dtype == torch.float32
