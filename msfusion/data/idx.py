"""IDX files (Fashion-MNIST, MNIST and any MNIST-format data), gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from msfusion.data.datasets import ArrayDataset
from msfusion.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_FASHION_HINT = "install it with `apt-get install dataset-fashion-mnist`, or pass the folder holding the 4 IDX files"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not, told apart by content).

    Args:
        path: the file.

    Returns:
        The array, in native byte order, with the dims the header declares.

    Raises:
        DataError: a missing file, a bad magic number, an unknown dtype, or a
            size that does not match the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (magic {raw[:4].hex() or 'empty'})")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX dtype byte 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header declares {ndim} dims but the file is {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {dims} x {dtype.itemsize} B = {expected} B, data is {len(raw) - header} B")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    # MNIST mirrors spell the files "train-images-idx3-ubyte" or "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing {root / (stem + '.gz')}: {_FASHION_HINT}")


def idx_array(root: Path, stem: str) -> np.ndarray:
    """One IDX file of a folder by stem: memory-mapped when uncompressed (a board's data may exceed its memory).

    Raises:
        DataError: missing or malformed.
    """
    path = _find_idx(root, stem)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"\x1f\x8b" or len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES:
        return read_idx(path)  # gzipped (or malformed: read_idx says why)
    dtype, ndim = _IDX_DTYPES[head[2]], head[3]
    dims = tuple(int(d) for d in np.fromfile(path, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if ndim == 0 or path.stat().st_size != expected:
        return read_idx(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=4 + 4 * ndim, shape=dims)


def _idx_split(root: Path, prefix: str, mean: float, std: float) -> ArrayDataset:
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {prefix} images {images.shape} do not match labels {labels.shape}")
    x = ((images.astype(np.float32) / 255.0 - mean) / std)[:, None, :, :]  # (N, H, W) -> (N, 1, H, W)
    return ArrayDataset(x.astype(np.float32), labels.astype(np.int64))


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DIR,
    mean: float = FASHION_MNIST_MEAN,
    std: float = FASHION_MNIST_STD,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load Fashion-MNIST, or any folder holding the 4 MNIST-format IDX files.

    Args:
        root: folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
        mean: normalization mean (of pixel / 255).
        std: normalization standard deviation.

    Returns:
        (train, test): x float32 (N, 1, 28, 28) as (pixel / 255 - mean) / std,
        y int64 (N,).

    Raises:
        DataError: a missing or malformed file (the message says how to install it).
    """
    root = Path(root)
    return _idx_split(root, "train", mean, std), _idx_split(root, "t10k", mean, std)
