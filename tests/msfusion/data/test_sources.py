"""Device-local data sources: every format from real files, exact pooled statistics, bad data, lazy decoding."""

from __future__ import annotations

import collections
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msfusion.data.idx import idx_array
from msfusion.data.shards import write_shard
from msfusion.data.sources import (
    DataSpec,
    TextSource,
    check_report,
    combine_reports,
    detect_format,
    open_source,
    read_whole,
)
from msfusion.errors import DataError
from msfusion.models.config import ModelConfig
from msfusion.wire.protocol import Preprocessing

RGB8 = ModelConfig(arch="cnn", in_channels=3, image_size=8, channels=(4,)).inputs()
GRAY8 = ModelConfig(arch="cnn", in_channels=1, image_size=8, channels=(4,)).inputs()


def _image(path: Path, mode: str, size: tuple[int, int], value: int = 51) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


def _pets(root: Path) -> Path:
    """cat: an RGB PNG and a JPEG of other sizes; dog: a grayscale PNG."""
    _image(root / "cat" / "a.png", "RGB", (10, 6), 255)
    _image(root / "cat" / "b.jpg", "RGB", (7, 7), 255)
    _image(root / "dog" / "c.png", "L", (12, 12), 51)
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(root: Path, prefix: str, x: np.ndarray, y: np.ndarray, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
        raw = _idx_bytes(array.astype(np.uint8))
        (root / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return root


def _write_cifar(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.concatenate([y[:, None], x.reshape(len(x), -1)], axis=1).astype(np.uint8).tobytes())
    return path


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ---------------------------------------------------------------- formats


def test_image_folder_resizes_converts_and_labels_by_sorted_folder(tmp_path: Path) -> None:
    root = _pets(tmp_path / "pets")
    for channels in (3, 1):
        source = open_source(DataSpec(root, channels=channels, image_size=8))
        x, y = source.arrays(None)
        batch = x[np.arange(len(x))]
        assert batch.shape == (3, channels, 8, 8) and batch.dtype == np.float32
        assert 0.0 <= batch.min() and batch.max() <= 1.0
        np.testing.assert_allclose(batch[:2], 1.0, atol=0.02)  # white cats (JPEG is lossy)
        np.testing.assert_allclose(batch[2], 51 / 255, atol=1e-6)  # the gray dog, in every channel
        assert y.tolist() == [0, 0, 1]
        assert source.report().class_counts == {"cat": 2, "dog": 1}
        assert source.report().sample_shape == [channels, 8, 8]


def test_idx_uncompressed_is_memory_mapped_and_gzip_reads_the_same(tmp_path: Path) -> None:
    x, y = _pixels(5, (4, 4)), np.array([0, 1, 2, 1, 0])
    plain, gz = _write_idx(tmp_path / "plain", "train", x, y), _write_idx(tmp_path / "gz", "train", x, y, gz=True)
    _write_idx(plain, "t10k", x[:2], y[:2])
    assert isinstance(idx_array(plain, "train-images-idx3-ubyte"), np.memmap)
    assert not isinstance(idx_array(gz, "train-images-idx3-ubyte.gz"), np.memmap)
    for root in (plain, gz):
        images, labels = open_source(DataSpec(root)).arrays(None)
        np.testing.assert_allclose(images[np.arange(5)], x[:, None] / 255.0, atol=1e-7)
        assert labels.tolist() == y.tolist()
    assert len(open_source(DataSpec(plain, split="test")).arrays(None)[1]) == 2


def test_cifar10_batches_split_train_and_test(tmp_path: Path) -> None:
    x, y = _pixels(6, (3, 32, 32)), np.array([0, 9, 3, 3, 1, 2])
    _write_cifar(tmp_path / "c" / "data_batch_1.bin", x[:4], y[:4])
    _write_cifar(tmp_path / "c" / "test_batch.bin", x[4:], y[4:])
    train, test = (open_source(DataSpec(tmp_path / "c", split=s)) for s in ("train", "test"))
    assert train.report().n_samples == 4 and train.report().sample_shape == [3, 32, 32]
    images, labels = train.arrays(None)
    np.testing.assert_allclose(images[np.arange(4)], x[:4] / 255.0, atol=1e-7)
    assert labels.tolist() == [0, 9, 3, 3] and test.arrays(None)[1].tolist() == [1, 2]


def test_npz_scales_uint8_keeps_floats_and_adds_the_channel_axis(tmp_path: Path) -> None:
    pixels, floats = _pixels(3, (5, 5)), np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)
    y = np.array([0, 1, 0])
    x8, _ = open_source(DataSpec(_write_npz(tmp_path / "u8.npz", pixels, y))).arrays(None)
    xf, _ = open_source(DataSpec(_write_npz(tmp_path / "f.npz", floats, y))).arrays(None)
    np.testing.assert_allclose(x8[np.arange(3)], pixels[:, None] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(xf[np.arange(3)], floats)


def test_shard_reads_images_and_encoded_windows(tmp_path: Path) -> None:
    x = np.random.default_rng(2).random((4, 1, 5, 5)).astype(np.float32)
    write_shard(tmp_path / "img", x, np.array([0, 1, 1, 0]), {"name": "s", "task": "classification"})
    images, labels = open_source(DataSpec(tmp_path / "img")).arrays(None)
    np.testing.assert_array_equal(images[np.arange(4)], x)
    assert labels.tolist() == [0, 1, 1, 0]
    windows = np.arange(12).reshape(3, 4)
    write_shard(tmp_path / "lm", windows, windows + 1, {"name": "t", "task": "lm"})
    lm = open_source(DataSpec(tmp_path / "lm"))
    assert lm.report().encoded and lm.report().sample_shape == [4]
    np.testing.assert_array_equal(lm.arrays(None)[0], windows)


def test_text_from_one_file_or_a_folder_of_txt(tmp_path: Path) -> None:
    one = open_source(DataSpec(_write_text(tmp_path / "play.txt", "héllo\n")))
    assert isinstance(one, TextSource)
    assert one.report().char_counts == {"\n": 1, "h": 1, "l": 2, "o": 1, "é": 1}
    _write_text(tmp_path / "books" / "a.txt", "ab")
    _write_text(tmp_path / "books" / "more" / "b.txt", "bc")
    _write_text(tmp_path / "books" / "notes.csv", "zzz")  # not text msfusion reads
    assert open_source(DataSpec(tmp_path / "books")).report().char_counts == {"a": 1, "b": 2, "c": 1}


def test_detect_format_tells_every_format_apart(tmp_path: Path) -> None:
    x, y = _pixels(2, (4, 4)), np.array([0, 1])
    write_shard(tmp_path / "shard", x[:, None] / 255.0, y, {"name": "s", "task": "classification"})
    found = {
        "images": _pets(tmp_path / "pets"),
        "idx": _write_idx(tmp_path / "idx", "train", x, y, gz=True),
        "cifar10": _write_cifar(tmp_path / "cifar" / "test_batch.bin", _pixels(1, (3, 32, 32)), y[:1]).parent,
        "npz": _write_npz(tmp_path / "d.npz", x, y),
        "shard": tmp_path / "shard",
        "text": _write_text(tmp_path / "corpus" / "a.txt", "abc").parent,
    }
    assert {fmt: detect_format(path) for fmt, path in found.items()} == {fmt: fmt for fmt in found}
    assert detect_format(tmp_path / "corpus" / "a.txt") == "text"


def test_missing_or_unreadable_paths_are_a_clear_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="does not exist"):
        open_source(DataSpec(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="cannot tell what data"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DataError, match="not a data file"):
        detect_format(tmp_path / "table.csv")


# ---------------------------------------------------------------- agreeing on the preprocessing


def test_pooled_statistics_are_exact_over_uneven_parts(tmp_path: Path) -> None:
    x, y = _pixels(60, (3, 6, 6), seed=3), np.random.default_rng(4).integers(0, 10, 60)
    cuts = [0, 5, 22, 23, 60]  # 5, 17, 1 and 37 samples
    parts = [_write_npz(tmp_path / f"p{i}.npz", x[a:b], y[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    rgb6 = ModelConfig(arch="cnn", in_channels=3, image_size=6, channels=(4,)).inputs()
    prep = combine_reports([open_source(DataSpec(p)).report() for p in parts], rgb6)
    pooled = x / 255.0
    np.testing.assert_allclose(prep.mean, pooled.mean(axis=(0, 2, 3)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(prep.std, pooled.std(axis=(0, 2, 3)), rtol=0, atol=1e-9)
    assert prep.classes == []  # integer labels stay as stored


def test_class_names_are_the_union_and_map_to_the_run_order(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "dog" / "1.png", "RGB", (8, 8))
    _image(tmp_path / "a" / "dog" / "2.png", "RGB", (8, 8))
    _image(tmp_path / "b" / "cat" / "1.png", "RGB", (8, 8))
    _image(tmp_path / "b" / "bird" / "1.png", "RGB", (8, 8))
    dogs, others = (
        open_source(DataSpec(tmp_path / "a", image_size=8)),
        open_source(DataSpec(tmp_path / "b", image_size=8)),
    )
    prep = combine_reports([dogs.report(), others.report()], RGB8)
    assert prep.classes == ["bird", "cat", "dog"]
    assert dogs.arrays(prep)[1].tolist() == [2, 2]
    assert dogs.arrays(Preprocessing(classes=["cat", "dog"]))[1].tolist() == [1, 1]


def test_digit_class_folders_keep_their_integer_labels(tmp_path: Path) -> None:
    for name in ("3", "7"):
        _image(tmp_path / "digits" / name / "a.png", "L", (8, 8))
    source = open_source(DataSpec(tmp_path / "digits", channels=1, image_size=8))
    prep = combine_reports([source.report()], GRAY8)
    assert prep.classes == [] and source.arrays(prep)[1].tolist() == [3, 7]  # as a .npz with labels 3, 7 would


def test_arrays_normalize_per_channel_with_the_run_statistics(tmp_path: Path) -> None:
    raw = np.random.default_rng(5).random((4, 3, 8, 8)).astype(np.float32)
    source = open_source(DataSpec(_write_npz(tmp_path / "f.npz", raw, np.array([0, 1, 2, 3]))))
    prep = Preprocessing(mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
    x, _ = source.arrays(prep)
    expected = (raw - np.array([0.1, 0.2, 0.3])[None, :, None, None]) / np.array([0.5, 1.0, 2.0])[None, :, None, None]
    np.testing.assert_allclose(x[np.arange(4)], expected, atol=1e-6)
    whole, _ = read_whole(DataSpec(tmp_path / "f.npz"), prep)
    np.testing.assert_allclose(whole.x, expected, atol=1e-6)


def test_text_vocabulary_is_the_most_frequent_characters_and_the_rest_is_oov(tmp_path: Path) -> None:
    texts = ["aab", "bcd", "ddde"]  # d 4, a 2, b 2, then c 1 and e 1 tie
    sources = [open_source(DataSpec(_write_text(tmp_path / f"{i}.txt", t))) for i, t in enumerate(texts)]
    reports = [s.report() for s in sources]
    pooled = collections.Counter("".join(texts))
    assert sum(r.n_samples for r in reports) == sum(pooled.values())
    lm = ModelConfig(arch="charlm", vocab_size=5, context=2).inputs()
    prep = combine_reports(reports, lm)
    assert prep.vocab == "abcd" and prep.context == 2  # c wins the tie with e
    assert combine_reports(reports, ModelConfig(arch="charlm", vocab_size=4, context=2).inputs()).vocab == "abd"
    source = sources[2]
    assert isinstance(source, TextSource)
    assert source.encoded(prep.vocab)[0].tolist() == [3, 3, 3, 4]  # e is out of vocabulary: id len(vocab)
    x, y = source.arrays(prep)
    assert x.tolist() == [[3, 3]] and y.tolist() == [[3, 3]]


def test_text_with_no_usable_report_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    report = open_source(DataSpec(tmp_path / "empty.txt")).report()
    assert report.fatal
    with pytest.raises(DataError):
        combine_reports([report], ModelConfig(arch="charlm").inputs())


# ---------------------------------------------------------------- bad data


def test_a_corrupt_image_is_skipped_with_a_reason(tmp_path: Path) -> None:
    root = _pets(tmp_path / "pets")
    (root / "dog" / "broken.png").write_bytes(np.random.default_rng(6).bytes(300))
    source = open_source(DataSpec(root, image_size=8))
    report = source.report()
    assert report.n_samples == 3 and report.class_counts == {"cat": 2, "dog": 1} and not report.fatal
    assert any("broken.png" in p for p in report.problems)
    x, y = source.arrays(None)
    assert x[np.arange(len(x))].shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 1]


def test_an_empty_class_folder_is_a_problem(tmp_path: Path) -> None:
    root = _pets(tmp_path / "pets")
    (root / "eel").mkdir()
    report = open_source(DataSpec(root)).report()
    assert any("'eel'" in p for p in report.problems) and not report.fatal and "eel" not in report.class_counts


def test_text_that_is_not_utf8_is_skipped_with_a_reason(tmp_path: Path) -> None:
    _write_text(tmp_path / "t" / "good.txt", "fine")
    (tmp_path / "t" / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    report = open_source(DataSpec(tmp_path / "t")).report()
    assert report.n_samples == 4 and not report.fatal
    assert any("bad.txt" in p and "UTF-8" in p for p in report.problems)


def test_one_class_is_a_problem_but_not_fatal(tmp_path: Path) -> None:
    report = open_source(DataSpec(_write_npz(tmp_path / "d.npz", _pixels(3, (4, 4)), np.array([2, 2, 2])))).report()
    assert any("one class" in p for p in report.problems) and not report.fatal


def test_nothing_readable_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "x.png").write_bytes(b"not a png")
    empty = _write_npz(tmp_path / "none.npz", np.zeros((0, 1, 4, 4), np.uint8), np.zeros(0, np.int64))
    for path in (tmp_path / "bad", empty):
        report = open_source(DataSpec(path)).report()
        assert report.fatal and check_report(report, RGB8) == report.fatal
    with pytest.raises(DataError):
        read_whole(DataSpec(tmp_path / "bad"))


def test_check_report_says_why_data_does_not_fit_the_model(tmp_path: Path) -> None:
    cifar = open_source(
        DataSpec(_write_cifar(tmp_path / "c" / "data_batch_1.bin", _pixels(2, (3, 32, 32)), np.array([0, 1])).parent)
    )
    text = open_source(DataSpec(_write_text(tmp_path / "t.txt", "some text")))
    gray = open_source(DataSpec(_write_npz(tmp_path / "g.npz", _pixels(3, (8, 8)), np.array([0, 1, 2]))))
    cnn = ModelConfig(arch="cnn").inputs()  # 1x28x28, 10 classes
    assert "classification" in check_report(text.report(), cnn)
    shape = check_report(cifar.report(), cnn)
    assert "3x32x32" in shape and "channels = 1" in shape and "image_size = 28" in shape
    two = ModelConfig(arch="cnn", image_size=8, channels=(4,), num_classes=2).inputs()
    assert "3 classes" in check_report(gray.report(), two)
    assert (
        check_report(gray.report(), GRAY8) == ""
        and check_report(text.report(), ModelConfig(arch="charlm").inputs()) == ""
    )


def test_images_are_decoded_only_when_indexed(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _image(tmp_path / "pets" / "cat" / f"{name}.png", "RGB", (8, 8))
    _image(tmp_path / "pets" / "dog" / "d.png", "RGB", (8, 8))
    source = open_source(DataSpec(tmp_path / "pets", image_size=8))
    assert source.report().n_samples == 4
    x, _ = source.arrays(None)
    (tmp_path / "pets" / "cat" / "c.png").unlink()  # sample 2: never indexed below
    assert x[np.array([0, 1, 3])].shape == (3, 3, 8, 8)
    assert x[np.array([], dtype=np.int64)].shape == (0, 3, 8, 8)
    with pytest.raises(DataError, match="c.png"):
        x[np.array([2])]
