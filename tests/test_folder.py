"""Tests for ressl.folder: scanning layouts, odd image modes, bad files, robust dataset."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ressl.decode import load_rgb
from ressl.errors import DataError, DataWarning
from ressl.folder import (
    IMAGE_EXTENSIONS,
    FileList,
    FolderIndex,
    ImageFolderDataset,
    scan_folder,
)


def _solid(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> Path:
    """Write a solid RGB image (W, H = size) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A 64x64 JPEG (top 8 rows red, rest noise) cut to half its bytes."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    arr[:8] = (255, 0, 0)
    full = path.with_name("full_tmp.jpg")
    Image.fromarray(arr).save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def _colour(t: torch.Tensor, y: int, x: int) -> list[int]:
    return t[:, y, x].tolist()


# ----------------------------------------------------------------------------- layouts


def test_class_layout_sorted_classes_and_labels(tmp_path: Path) -> None:
    _solid(tmp_path / "zebra" / "1.png")
    _solid(tmp_path / "apple" / "b.JPG")  # upper-case extension counts
    _solid(tmp_path / "apple" / "nested" / "deep" / "a.png")  # label = first-level folder
    _solid(tmp_path / "apple" / ".hidden.png")  # hidden file ignored
    _solid(tmp_path / ".cache" / "x.png")  # hidden folder ignored (not a class)
    (tmp_path / "empty_dir").mkdir()  # no images: not a class
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    (tmp_path / "LICENSE.txt").write_text("not an image")  # non-image at root: still class layout
    idx = scan_folder(tmp_path)
    assert idx.classes == ["apple", "zebra"]
    rel = [p.relative_to(tmp_path).as_posix() for p in idx.files]
    assert rel == ["apple/b.JPG", "apple/nested/deep/a.png", "zebra/1.png"]
    assert idx.labels == [0, 0, 1]


def test_file_list_behaves_as_the_list_of_paths_it_stores(tmp_path: Path) -> None:
    names = ["cat/0.png", "cat/deep/é 1.JPG", "dog/x.png", "d\udcff.png"]  # a non-UTF-8 byte, as os.walk returns it
    paths = [tmp_path / n for n in names]
    files = FileList(tmp_path, names)
    assert len(files) == 4 and list(files) == paths and files == paths and files != paths[:3]
    assert [files[i] for i in range(-4, 4)] == paths[-4:] + paths
    assert files[1:3] == paths[1:3] and isinstance(files[1:3], FileList) and files[::-1] == paths[::-1]
    assert files.take([3, 0, 0]) == [paths[3], paths[0], paths[0]] and files.relative(1) == "cat/deep/é 1.JPG"
    with pytest.raises(IndexError):
        files[4]
    assert pickle.loads(pickle.dumps(files)) == files  # as loader workers receive it when processes are spawned
    assert FileList(tmp_path, []) == [] and len(FileList(tmp_path, [])[1:]) == 0


def test_scan_keeps_file_names_compact_and_as_before(tmp_path: Path) -> None:
    """The scan stores its paths as a FileList (two arrays), in the order of the paths relative to the root."""
    for name in ("b/2.png", "b/10.png", "a/z/1.png", "a/y.png", "a.b/0.png"):
        _solid(tmp_path / name)
    idx = scan_folder(tmp_path)
    assert isinstance(idx.files, FileList) and idx.classes == ["a", "a.b", "b"]
    assert [p.relative_to(tmp_path).as_posix() for p in idx.files] == ["a/y.png", "a/z/1.png", "a.b/0.png", "b/10.png", "b/2.png"]
    assert idx.labels == [0, 0, 1, 2, 2]


def test_flat_layout_is_unlabeled_and_recursive(tmp_path: Path) -> None:
    _solid(tmp_path / "b.png")
    _solid(tmp_path / "a.jpeg")
    _solid(tmp_path / "sub" / "c.webp")  # a sub-folder is NOT a class when root holds images
    _solid(tmp_path / "sub" / ".thumbs" / "t.png")  # nested hidden folder ignored
    idx = scan_folder(tmp_path)
    assert idx.labels is None and idx.classes is None
    assert [p.relative_to(tmp_path).as_posix() for p in idx.files] == ["a.jpeg", "b.png", "sub/c.webp"]


def test_loose_images_beside_class_folders_are_skipped_with_a_warning(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(3):
            _solid(tmp_path / cls / f"{i}.png")
    _solid(tmp_path / "stray.png")
    _solid(tmp_path / "IMG_1.JPG")
    with pytest.warns(DataWarning) as record:
        idx = scan_folder(tmp_path)
    assert idx.classes == ["cat", "dog"] and idx.labels == [0, 0, 0, 1, 1, 1]
    assert all(p.parent != tmp_path for p in idx.files)
    (message,) = [str(w.message) for w in record]
    assert "skipped 2 image files directly in" in message and "IMG_1.JPG, stray.png" in message
    assert "\n" not in message


def test_scan_warnings_come_from_the_first_process_of_a_machine_only(tmp_path: Path, monkeypatch) -> None:
    """Every process of a torchrun job scans the same files: the machine's first warns, the others skip alike."""
    for cls in ("cat", "dog"):
        for i in range(3):
            _solid(tmp_path / cls / f"{i}.png")
    _solid(tmp_path / "stray.png")
    (tmp_path / "cat" / "broken.png").write_text("this is not a png")
    (tmp_path / "dog" / "IMG_1.heic").write_bytes(b"not decoded")
    with pytest.warns(DataWarning) as record:
        first = scan_folder(tmp_path, max_bad_fraction=0.5)
    assert len(record) == 3  # the stray, the unread format, the unreadable file
    monkeypatch.setenv("LOCAL_RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = scan_folder(tmp_path, max_bad_fraction=0.5)
    assert other == first and len(first.files) == 6


def test_mostly_loose_images_stay_one_unlabeled_folder(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "cat/1.png", "dog/1.png"):  # as many loose images as in sub-folders
        _solid(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = scan_folder(tmp_path)
    assert idx.labels is None and len(idx.files) == 4


def test_one_sub_folder_beside_loose_images_is_part_of_one_unlabeled_folder(tmp_path: Path) -> None:
    """Strays need two or more class folders: one sub-folder, however full, is not a set of classes (a label that is
    always 0 would teach nothing and hide the loose image)."""
    for name in ("cover.png", "album/1.png", "album/2.png", "album/3.png"):
        _solid(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = scan_folder(tmp_path)
    assert idx.labels is None and idx.classes is None
    assert [p.relative_to(tmp_path).as_posix() for p in idx.files] == ["album/1.png", "album/2.png", "album/3.png", "cover.png"]


def test_scan_order_is_deterministic(tmp_path: Path) -> None:
    for name in ["k", "c", "x", "a"]:
        _solid(tmp_path / "cls" / f"{name}.png")
    assert scan_folder(tmp_path).files == scan_folder(tmp_path).files
    assert [p.name for p in scan_folder(tmp_path).files] == ["a.png", "c.png", "k.png", "x.png"]


def test_missing_dir_error_is_one_helpful_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        scan_folder(missing)
    msg = str(info.value)
    assert "\n" not in msg and str(missing) in msg and "does not exist" in msg and "--data" in msg


def test_empty_dir_error_names_extensions(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert all(ext in msg for ext in IMAGE_EXTENSIONS)


def test_jpeg_under_other_names_is_read(tmp_path: Path) -> None:
    for name in ("a.jfif", "b.JPE"):  # JPEG as browsers on Windows and old cameras name it
        Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / name, format="JPEG")
    idx = scan_folder(tmp_path)
    assert [p.name for p in idx.files] == ["a.jfif", "b.JPE"]
    assert _colour(load_rgb(idx.files[1]), 0, 0)[2] > 200


@pytest.mark.parametrize("ext,feature", [(".tga", None), (".avif", "avif"), (".jp2", "jpg_2000"), (".J2K", "jpg_2000")])
def test_formats_the_installed_pillow_decodes_are_read_and_otherwise_counted_as_unread(tmp_path: Path, ext, feature) -> None:
    """TGA always; AVIF and JPEG 2000 where Pillow has their codecs, else they are named in the unread-format warning."""
    from PIL import features

    _solid(tmp_path / "a.png")
    if feature is not None and not features.check(feature):
        (tmp_path / f"b{ext}").write_bytes(b"not decoded")
        with pytest.warns(DataWarning, match=f"1 {ext.lower()}: b{ext}"):
            assert [p.name for p in scan_folder(tmp_path).files] == ["a.png"]
        return
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / f"b{ext}", format={".tga": "TGA", ".avif": "AVIF"}.get(ext, "JPEG2000"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = scan_folder(tmp_path)
    assert [p.name for p in idx.files] == ["a.png", f"b{ext}"]
    red, green, blue = _colour(load_rgb(idx.files[1]), 8, 8)
    assert blue > 200 and red < 40 and green < 40  # lossy codecs: near the colour written


def test_images_in_formats_not_read_are_counted_in_one_warning(tmp_path: Path) -> None:
    _solid(tmp_path / "cat" / "1.png")
    _solid(tmp_path / "dog" / "2.png")
    for name in ("cat/IMG_1.HEIC", "cat/deep/IMG_2.heic", "dog/raw.dng"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not decoded")
    (tmp_path / "dog" / "labels.txt").write_text("not an image: no word about it")
    (tmp_path / "dog" / ".thumb.heic").write_bytes(b"hidden: no word about it")
    with pytest.warns(DataWarning) as record:
        idx = scan_folder(tmp_path)
    assert [p.name for p in idx.files] == ["1.png", "2.png"]
    [msg] = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert "passed over 3 image files" in msg and "2 .heic and 1 .dng" in msg
    assert "cat/IMG_1.HEIC" in msg and "cat/deep/IMG_2.heic" in msg and "dog/raw.dng" in msg
    assert "labels.txt" not in msg and "thumb" not in msg and "JPEG or PNG" in msg


def test_no_warning_without_unread_images(tmp_path: Path) -> None:
    _solid(tmp_path / "1.png")
    (tmp_path / "notes.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_folder(tmp_path)


def test_folder_of_only_unread_images_says_so(tmp_path: Path) -> None:
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "IMG_1.heic").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "1 .heic: holiday/IMG_1.heic" in msg and "convert them to JPEG or PNG" in msg


# ----------------------------------------------------------------------------- odd files


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """A flat folder with every odd case the loader must handle."""
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a png")
    _truncated_jpeg(tmp_path / "truncated.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # red
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 255)  # opaque red
    rgba[:, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "palette.png", transparency=1)  # index 1 (green) is transparent
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(np.full((3, 4), 77, np.uint8), "L").save(tmp_path / "gray8.png")
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "float.tif")
    return tmp_path


def test_scan_skips_unreadable_with_one_warning(odd_folder: Path) -> None:
    with pytest.warns(DataWarning) as record:
        idx = scan_folder(odd_folder, max_bad_fraction=0.5)
    assert len([w for w in record if issubclass(w.category, DataWarning)]) == 1
    msg = str(record[0].message)
    assert "zero.jpg (empty file)" in msg and "text.png (not a readable image)" in msg and "skipped 2 unreadable" in msg
    names = {p.name for p in idx.files}
    assert "zero.jpg" not in names and "text.png" not in names
    assert {"truncated.jpg", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png"} <= names


def test_verify_false_keeps_every_file(odd_folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = scan_folder(odd_folder, verify=False)
    assert {"zero.jpg", "text.png"} <= {p.name for p in idx.files}


@pytest.mark.filterwarnings("ignore:.*is damaged or truncated:ressl.folder.DataWarning")  # truncated.jpg: its own test below
def test_all_convertible_files_load_as_rgb_uint8(odd_folder: Path) -> None:
    with pytest.warns(DataWarning):
        idx = scan_folder(odd_folder, max_bad_fraction=0.5)
    for path in idx.files:
        t = load_rgb(path)
        assert t is not None, path.name
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3, path.name


def test_unreadable_files_give_none(odd_folder: Path) -> None:
    assert load_rgb(odd_folder / "zero.jpg") is None
    assert load_rgb(odd_folder / "text.png") is None
    assert load_rgb(odd_folder / "does_not_exist.png") is None


def test_truncated_jpeg_partial_decode_and_flag_restored(odd_folder: Path, monkeypatch) -> None:
    monkeypatch.setattr("ressl.decode._truncated_warned", False)
    with pytest.warns(DataWarning, match="truncated.jpg is damaged or truncated: decoded only in part"):
        t = load_rgb(odd_folder / "truncated.jpg")
    assert t is not None and t.shape == (3, 64, 64)
    r, g, b = _colour(t, 2, 2)
    assert r > 200 and g < 50 and b < 50  # decoded part kept
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global flag not leaked
    with warnings.catch_warnings(record=True) as later:  # later truncated files: used the same way, without a warning
        warnings.simplefilter("always")
        again = load_rgb(odd_folder / "truncated.jpg")
    assert again is not None and torch.equal(again, t)
    assert [str(w.message) for w in later if issubclass(w.category, DataWarning)] == []


def test_cmyk_colours(odd_folder: Path) -> None:
    t = load_rgb(odd_folder / "cmyk.jpg")
    assert t is not None
    r, g, b = _colour(t, 4, 4)
    assert r > 240 and g < 15 and b < 15


def test_rgba_composited_on_white(odd_folder: Path) -> None:
    t = load_rgb(odd_folder / "rgba.png")
    assert t is not None and t.shape == (3, 2, 3)
    assert _colour(t, 0, 0) == [255, 0, 0]
    assert _colour(t, 0, 1) == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in _colour(t, 1, 2))


def test_palette_with_transparency(odd_folder: Path) -> None:
    t = load_rgb(odd_folder / "palette.png")
    assert t is not None
    assert _colour(t, 0, 0) == [255, 0, 0]
    assert _colour(t, 0, 1) == [255, 255, 255]  # transparent green -> white


def test_16bit_gray_is_scaled_not_clipped(odd_folder: Path) -> None:
    t = load_rgb(odd_folder / "gray16.png")
    assert t is not None and t.shape == (3, 1, 3)
    for c in range(3):
        assert t[c, 0, 0] == 0 and t[c, 0, 2] == 255 and abs(int(t[c, 0, 1]) - 128) <= 1


def test_gray8_bits_and_float(odd_folder: Path) -> None:
    gray = load_rgb(odd_folder / "gray8.png")
    assert gray is not None and gray.shape == (3, 3, 4) and bool((gray == 77).all())
    bits = load_rgb(odd_folder / "bits.png")
    assert bits is not None and _colour(bits, 0, 0) == [0, 0, 0] and _colour(bits, 0, 1) == [255] * 3
    flt = load_rgb(odd_folder / "float.tif")
    assert flt is not None and flt[0, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "o.png", exif=exif)
    t = load_rgb(tmp_path / "o.png")
    assert t is not None and t.shape == (3, 4, 2)  # (H, W) swapped
    assert _colour(t, 0, 1) == [255, 0, 0]  # stored top-left ends up top-right


def test_too_many_bad_files_raise(tmp_path: Path) -> None:
    _solid(tmp_path / "good.png")
    (tmp_path / "bad1.jpg").write_bytes(b"")
    (tmp_path / "bad2.png").write_text("nope")
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "max_bad_fraction" in msg and "2 of 3" in msg and "bad1.jpg" in msg
    with pytest.warns(DataWarning):
        assert len(scan_folder(tmp_path, max_bad_fraction=0.7).files) == 1


def test_bad_files_at_exactly_max_bad_fraction_are_skipped(tmp_path: Path) -> None:
    """``max_bad_fraction`` is the most that may fail: at it the files are skipped, only past it the scan stops."""
    _solid(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.warns(DataWarning, match="skipped 1 unreadable of 2"):
        assert [p.name for p in scan_folder(tmp_path, max_bad_fraction=0.5).files] == ["good.png"]


def test_labels_stay_with_their_files_when_unreadable_ones_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "apple" / "0.png").parent.mkdir()
    (tmp_path / "apple" / "0.png").write_text("not a png")
    _solid(tmp_path / "apple" / "1.png")
    _solid(tmp_path / "pear" / "2.png")
    with pytest.warns(DataWarning, match="apple/0.png"):
        idx = scan_folder(tmp_path, max_bad_fraction=0.5)
    assert [p.relative_to(tmp_path).as_posix() for p in idx.files] == ["apple/1.png", "pear/2.png"]
    assert idx.labels == [0, 1] and idx.classes == ["apple", "pear"]


def test_bad_file_lists_name_ten_then_count_the_rest() -> None:
    from ressl.folder import listed

    ten = [f"{i}.png" for i in range(10)]
    assert listed(ten) == ", ".join(ten)
    assert listed([*ten, "10.png", "11.png"]) == ", ".join(ten) + " ... and 2 more"


def test_all_bad_raises_even_with_high_threshold(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.raises(DataError):
        scan_folder(tmp_path, max_bad_fraction=1.0)


# ----------------------------------------------------------------------------- dataset


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _coloured_classes(root: Path) -> FolderIndex:
    for i, colour in enumerate(COLOURS):
        _solid(root / f"c{i // 2}" / f"{i}.png", colour)
    return scan_folder(root)


def test_dataset_items_labels_and_transform(tmp_path: Path) -> None:
    idx = _coloured_classes(tmp_path)
    ds = ImageFolderDataset(idx)
    assert len(ds) == 4
    for i, colour in enumerate(COLOURS):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 6, 8)
        assert _colour(img, 0, 0) == list(colour) and label == i // 2
    ds_t = ImageFolderDataset(idx, transform=lambda x: x.float().mean().item())
    assert ds_t[0][0] == pytest.approx(255 / 3)
    with pytest.raises(IndexError):
        ds[4]


def test_dataset_flat_label_is_minus_one(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png")
    _, label = ImageFolderDataset(scan_folder(tmp_path))[0]
    assert label == -1


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_dataset_replaces_file_broken_after_scan(tmp_path: Path, damage: str) -> None:
    idx = _coloured_classes(tmp_path)
    broken = idx.files[1]
    if damage == "delete":
        broken.unlink()
    else:
        broken.write_bytes(broken.read_bytes()[:20])
    ds = ImageFolderDataset(idx, max_bad_fraction=0.5)
    with pytest.warns(DataWarning) as record:
        img, label = ds[1]
    assert str(broken) in str(record[0].message)
    assert _colour(img, 0, 0) == list(COLOURS[2]) and label == 1  # deterministic: next sample, its label
    assert ds.failed_files == [broken]
    assert _colour(ds[0][0], 0, 0) == list(COLOURS[0])  # others unaffected
    idx.files[3].unlink()  # a second failure: recorded, replaced (wrapping around), no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img2, _ = ds[1]
        img3, label3 = ds[3]
    assert torch.equal(img, img2)
    assert _colour(img3, 0, 0) == list(COLOURS[0]) and label3 == 0
    assert ds.failed_files == [broken, idx.files[3]]


def test_loader_workers_count_their_broken_files_together(tmp_path: Path) -> None:
    """Two workers meet two broken files each: 4 of 20 is over the 15% allowed, though each worker's 2 are not."""
    for i in range(20):
        _solid(tmp_path / f"{i:02d}.png")
    idx = scan_folder(tmp_path)
    for i in (0, 2, 9, 11):  # worker 0 loads the even indices, worker 1 the odd: each replaces its own with the next
        idx.files[i].write_bytes(b"broken after the scan")
    ds = ImageFolderDataset(idx, max_bad_fraction=0.15)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    with pytest.raises(DataError, match="4 of 20 images failed to load"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(loader)
    assert [p.name for p in ds.failed_files] == ["00.png", "02.png", "09.png", "11.png"]  # seen here too


def test_evaluation_datasets_stop_at_a_broken_file_instead_of_replacing_it(tmp_path: Path) -> None:
    """An evaluation's rows stand for their files (embed's files.txt): no other image may take a broken one's row."""
    idx = _coloured_classes(tmp_path)
    idx.files[1].unlink()
    ds = ImageFolderDataset(idx, max_bad_fraction=0.5, replace=False)
    assert _colour(ds[0][0], 0, 0) == list(COLOURS[0])
    with pytest.raises(DataError, match=f"{idx.files[1].name} could not be decoded .*fix or delete it"):
        ds[1]


def test_a_record_carries_broken_and_partly_decoded_files_from_one_epochs_dataset_to_the_next(tmp_path: Path,
                                                                                            monkeypatch) -> None:
    """Training makes a dataset per epoch: with the split's record, a file found broken in one epoch is passed over in
    the next without a second warning, and counts once against ``max_bad_fraction``; a file decoded only in part is
    used in every epoch and warned about once (it used to be once per loader worker, so once or more per epoch)."""
    monkeypatch.setattr("ressl.decode._truncated_warned", True)  # what another test of this process may have left
    idx = _coloured_classes(tmp_path)
    idx.files[1].write_bytes(b"broken after the scan")
    _truncated_jpeg(idx.files[2])
    record = torch.zeros(len(idx.files), dtype=torch.uint8)
    said = []
    for _epoch in range(2):
        ds = ImageFolderDataset(idx, max_bad_fraction=0.5, record=record)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            images = [ds[i][0] for i in range(len(ds))]
        said.append([str(w.message) for w in seen if issubclass(w.category, DataWarning)])
        assert ds.failed_files == [idx.files[1]] and torch.equal(images[1], images[2])  # the next file in its place
    assert len(said[0]) == 2 and "could not decode" in said[0][0] and "is damaged or truncated" in said[0][1]
    assert said[1] == []
    assert record.tolist() == [0, 1, 2] + [0] * (len(idx.files) - 3)
    with pytest.raises(DataError, match=f"{idx.files[1].name} could not be decoded"):  # an evaluation's rows: no stand-in
        ImageFolderDataset(idx, replace=False, record=record)[1]
    with pytest.raises(ValueError, match="record"):
        ImageFolderDataset(idx, record=torch.zeros(2, dtype=torch.uint8))


def test_partly_decoded_files_warn_once_per_record_and_are_not_counted_as_broken(tmp_path: Path, monkeypatch) -> None:
    """A file decoded only in part is used: the first of a record gets a warning, a second none. It is not a failure:
    ``max_bad_fraction`` counts the broken files alone, and a broken file read after it still gets its own warning."""
    monkeypatch.setattr("ressl.decode._truncated_warned", True)  # what another test of this process may have left
    idx = _coloured_classes(tmp_path)
    _truncated_jpeg(idx.files[0])
    idx.files[2].write_bytes(b"broken after the scan")
    _truncated_jpeg(idx.files[3])
    record = torch.zeros(len(idx.files), dtype=torch.uint8)
    ds = ImageFolderDataset(idx, max_bad_fraction=0.25, record=record)  # 1 broken of 4: allowed; 3 would not be
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(len(ds)):
            ds[i]
    said = [str(w.message) for w in seen if issubclass(w.category, DataWarning)]
    assert len(said) == 2, said
    assert "0.png is damaged or truncated" in said[0] and "could not decode" in said[1] and "2.png" in said[1]
    assert record.tolist() == [2, 0, 1, 2] and ds.failed_files == [idx.files[2]]


def test_dataset_too_many_failures_raise(tmp_path: Path) -> None:
    idx = _coloured_classes(tmp_path)
    for p in idx.files[1:]:
        p.unlink()
    ds = ImageFolderDataset(idx, max_bad_fraction=0.5)
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(ds)):
            ds[i]
    assert "max_bad_fraction" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- how warnings print


def test_data_warning_prints_one_clean_line(tmp_path: Path) -> None:
    """On a terminal a DataWarning is one line (no file:line prefix, no source line under it)."""
    import subprocess
    import sys

    _solid(tmp_path / "a" / "1.png")
    _solid(tmp_path / "b" / "1.png")
    _solid(tmp_path / "b" / "2.png")
    _solid(tmp_path / "loose.png")
    code = "import sys; from ressl.folder import scan_folder; scan_folder(sys.argv[1])"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=True)
    expected = (f"ressl: warning: skipped 1 image file directly in {tmp_path}, beside its 2 class folders "
                "(labels come from the class folders): loose.png; move it into a class folder")
    assert done.stderr.splitlines() == [expected]


def test_other_warnings_keep_their_format() -> None:
    text = warnings.formatwarning("careful", UserWarning, "/x/y.py", 7)
    assert text.startswith("/x/y.py:7: UserWarning: careful")
    assert warnings.formatwarning("skipped", DataWarning, "/x/y.py", 7) == "ressl: warning: skipped\n"
    huge = warnings.formatwarning("Image size exceeds limit", Image.DecompressionBombWarning, "/PIL/Image.py", 3593)
    assert huge == "ressl: warning: Image size exceeds limit\n"


@pytest.mark.parametrize("terminal", [True, False])
def test_a_loader_workers_data_warning_starts_on_a_line_of_its_own(terminal: bool, monkeypatch) -> None:
    """In a loader worker the main process's progress bar holds the terminal's line: the warning starts below it. In
    a log file no bar is drawn within a minute, and no blank line comes first."""
    from torch.utils.data import DataLoader

    from ressl import progress

    class Warns(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> str:
            return warnings.formatwarning("truncated", DataWarning, "/x/y.py", 7)

    monkeypatch.setattr(progress, "live", lambda: terminal)  # the workers are forked with it
    assert [text for batch in DataLoader(Warns(), batch_size=None, num_workers=1) for text in [batch]] == [
        ("\n" if terminal else "") + "ressl: warning: truncated\n"]
    # outside a loader worker the warning is its one line, on a terminal too
    assert warnings.formatwarning("truncated", DataWarning, "/x/y.py", 7) == "ressl: warning: truncated\n"


def test_own_message_strips_a_loader_workers_traceback() -> None:
    from ressl.errors import own_message

    wrapped = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\nressl.errors.DataError: 2 of 9 images failed to load (a.png: b)')
    assert own_message(wrapped) == "2 of 9 images failed to load (a.png: b)"
    assert own_message(DataError("plain: message")) == "plain: message"


def test_symlinks_back_into_the_data_list_no_image_twice(tmp_path: Path) -> None:
    """A link up the tree or into another class is not followed: each image once, under its own class."""
    for cls in ("blue", "red"):
        for i in range(2):
            _solid(tmp_path / cls / f"{i}.png")
    (tmp_path / "blue" / "up").symlink_to("..")
    (tmp_path / "blue" / "r").symlink_to("../red")
    (tmp_path / "red" / "self").symlink_to(".")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-extra"
    _solid(elsewhere / "deep" / "x.png")
    (tmp_path / "red" / "more").symlink_to(elsewhere)  # a link out of the tree is followed
    _solid(tmp_path / "stray.png")  # skipped beside the classes: not taken into blue/ by way of blue/up either
    with pytest.warns(DataWarning, match="skipped 1 image file directly in"):
        idx = scan_folder(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in idx.files]
    assert rel == ["blue/0.png", "blue/1.png", "red/0.png", "red/1.png", "red/more/deep/x.png"]
    assert idx.labels == [0, 0, 1, 1, 1]


def test_a_glance_for_images_passes_over_folders_it_cannot_read(tmp_path: Path, monkeypatch) -> None:
    """A data root at a disk's top holds lost+found, which only root may read: the glance that tells an image folder
    from torchvision's files goes past it instead of raising."""
    from ressl import folder

    (tmp_path / "lost+found").mkdir()
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    scandir = folder.os.scandir

    def refusing(path):
        if Path(path).name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(folder.os, "scandir", refusing)
    assert not folder.holds_images(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "cifar-10-batches-py" / "x.png")
    assert folder.holds_images(tmp_path)
    # a --data that does not exist, or is a file: no images, not an error
    assert not folder.holds_images(tmp_path / "nowhere") and not folder.holds_images(tmp_path / "cifar-10-batches-py" / "x.png")
