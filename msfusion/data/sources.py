"""Device-local data sources: the data a board holds, in the formats people have (numpy + Pillow, no torch).

A source is declared by a `DataSpec` (the `[data]` table of device.toml, or
`--data PATH` on the coordinator's commands) and opened with `open_source`:

=========== ==================================================================
format      what `path` is
=========== ==================================================================
images      a folder of class subfolders of PNG/JPEG/BMP/GIF/WebP files,
            decoded lazily (a batch at a time) through Pillow, converted to
            grayscale or RGB and resized to `image_size` x `image_size`
idx         a folder of MNIST-format IDX files (`train-images-idx3-ubyte`
            and `train-labels-idx1-ubyte`, `.gz` or not; `split = "test"`
            reads `t10k-*`); uncompressed files are memory-mapped
cifar10     CIFAR-10's binary batches (`data_batch_1..5.bin`, or
            `test_batch.bin` for `split = "test"`), memory-mapped
npz         one `.npz` file with arrays `x` (N, C, H, W) or (N, H, W) and
            `y` (N,): uint8 pixels are scaled by 1/255, floats kept
shard       a shard folder (`msfusion partition`, `data/shards.py`)
text        one UTF-8 text file, or a folder of them (`*.txt`), for the char-LM
=========== ==================================================================

`format = "auto"` tells them apart by what is on disk.

Every source gives *raw* inputs: image pixels in [0, 1] (channels first),
text as characters. What turns them into the model's inputs is the run's
`Preprocessing` (per-channel mean and std, the class names in label order, the
vocabulary and window length), which the coordinator agrees from the devices'
`DataReport`s without moving data (`combine_reports`): each device reports
per-channel count / mean / sum of squared deviations (combined exactly by
Chan et al.'s pairwise update), its class counts and its character counts.

Users' data is not always clean. What a source cannot read is skipped with a
reason in `DataReport.problems` (a corrupt image, an empty class folder, a
text file that is not UTF-8, a shard with a single class); what leaves the
device nothing to train on is `DataReport.fatal` (no readable sample, no
class), and the coordinator leaves that device out of planning.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from msfusion.data.cifar import read_cifar_records
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import idx_array
from msfusion.data.shards import DATA_FILE, META_FILE, read_shard
from msfusion.errors import DataError
from msfusion.wire.protocol import ChannelStats, DataReport, Preprocessing

log = logging.getLogger(__name__)

FORMATS = ("auto", "images", "idx", "cifar10", "npz", "shard", "text")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md"})
OOV = "\ufffd"  # how an out-of-vocabulary character is shown; its id is len(vocab)
STATS_CHUNK = 256  # images decoded at a time while computing statistics
MAX_PROBLEMS = 20  # problems listed in a report (the count says how many more)


@dataclass(frozen=True)
class DataSpec:
    """Where a device's (or the coordinator's) data is and how to read it.

    Attributes:
        path: the file or folder.
        format: one of `FORMATS` ("auto": told apart by what is on disk).
        split: "train" or "test": which files of an idx / cifar10 folder.
        channels: images: 1 (grayscale) or 3 (RGB).
        image_size: images: the side every image is resized to.
    """

    path: Path
    format: str = "auto"
    split: str = "train"
    channels: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "path", Path(self.path).expanduser())
        except RuntimeError as exc:  # `~user/...` of no such user
            raise DataError(f"data path {self.path!r}: {exc}") from exc
        if self.format not in FORMATS:
            raise DataError(f"data format must be one of {FORMATS}, got {self.format!r}")
        if self.split not in ("train", "test"):
            raise DataError(f"data split must be 'train' or 'test', got {self.split!r}")
        if self.channels not in (1, 3):
            raise DataError(f"data channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if not 1 <= self.image_size <= 1024:
            raise DataError(f"data image_size must be in [1, 1024], got {self.image_size!r}")

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "[data]") -> DataSpec:
        """From a TOML table (unknown keys refused)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise DataError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
        if "path" not in table:
            raise DataError(f"{where} needs a 'path'")
        kinds: dict[str, Any] = {"path": (str, Path), "format": str, "split": str, "channels": int, "image_size": int}
        wrong = sorted(k for k, v in table.items() if not (isinstance(v, kinds[k]) and not isinstance(v, bool)))
        if wrong:
            raise DataError(f"{where}: {', '.join(f'{k} = {table[k]!r}' for k in wrong)} of the wrong type")
        try:
            return cls(**table)
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from exc

    def to_table(self) -> dict[str, Any]:
        """As a TOML table (`edge_runtime.config.to_toml`)."""
        return {
            name: str(getattr(self, name)) if name == "path" else getattr(self, name)
            for name in self.__dataclass_fields__
        }


def detect_format(path: Path) -> str:
    """The format of what is at `path` (see the module docstring).

    Raises:
        DataError: nothing there, or nothing msfusion reads.
    """
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return "npz"
        if path.suffix.lower() in TEXT_SUFFIXES:
            return "text"
        raise DataError(f"{path}: not a data file msfusion reads (.npz, or text: {sorted(TEXT_SUFFIXES)})")
    names = {p.name for p in path.iterdir()}
    if {DATA_FILE, META_FILE} <= names:
        return "shard"
    if any(n.startswith("train-images") or n.startswith("t10k-images") for n in names):
        return "idx"
    if "test_batch.bin" in names or "data_batch_1.bin" in names or "cifar-10-batches-bin" in names:
        return "cifar10"
    subfolders = [path / n for n in names if (path / n).is_dir()]
    if any(f.suffix.lower() in IMAGE_SUFFIXES for d in subfolders for f in d.rglob("*")):
        return "images"
    if any(p.suffix.lower() in TEXT_SUFFIXES and p.is_file() for p in path.rglob("*")):
        return "text"
    if subfolders:
        return "images"  # class folders without images: the source reports why
    raise DataError(
        f"{path}: cannot tell what data this is (expected class subfolders of images, IDX files, "
        "CIFAR-10 batches, a shard, a .npz file or text files)"
    )


# ---------------------------------------------------------------- statistics


def channel_stats(x: np.ndarray) -> ChannelStats:
    """Per-channel count, mean and sum of squared deviations of images (N, C, H, W), in float64."""
    flat = np.asarray(x, dtype=np.float64).transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    count = flat.shape[1]
    mean = flat.mean(axis=1) if count else np.zeros(flat.shape[0])
    m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
    return ChannelStats(count=int(count), mean=[float(v) for v in mean], m2=[float(v) for v in m2])


def merge_stats(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Chan et al.'s pairwise update: the statistics of the two sets pooled, exact up to rounding."""
    if not a.count:
        return b
    if not b.count:
        return a
    if len(a.mean) != len(b.mean):
        raise DataError(f"cannot pool statistics of {len(a.mean)} and {len(b.mean)} channels")
    n = a.count + b.count
    ma, mb = np.asarray(a.mean), np.asarray(b.mean)
    delta = mb - ma
    mean = ma + delta * (b.count / n)
    m2 = np.asarray(a.m2) + np.asarray(b.m2) + delta**2 * (a.count * b.count / n)
    return ChannelStats(count=n, mean=[float(v) for v in mean], m2=[float(v) for v in m2])


# ---------------------------------------------------------------- sources


class Source(Protocol):
    """What `open_source` returns: a data set on disk, read as training needs it."""

    spec: DataSpec
    task: str  # "classification" or "lm"

    def report(self) -> DataReport:
        """Statistics, class or character counts, problems (computed once, then cached)."""
        ...

    def arrays(self, prep: Preprocessing | None) -> tuple[Any, Any]:
        """(x, y), indexable by an index array, as the model takes them under `prep`."""
        ...


def _trim(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more"]


def _class_problems(counts: Mapping[str, int]) -> list[str]:
    if len(counts) == 1:
        return [f"every sample is of one class ({next(iter(counts))!r}): this device only ever sees that class"]
    return []


def _label_index(prep: Preprocessing | None) -> dict[str, int] | None:
    return {name: i for i, name in enumerate(prep.classes)} if prep is not None and prep.classes else None


def normalize(x: np.ndarray, prep: Preprocessing | None) -> np.ndarray:
    """Images (N, C, H, W) as the model takes them: (x - mean) / std per channel, float32."""
    x = np.asarray(x, dtype=np.float32)
    if prep is None or not prep.mean:
        return x
    if len(prep.mean) != x.shape[1]:
        raise DataError(f"the run normalizes {len(prep.mean)} channels, the data has {x.shape[1]}")
    mean = np.asarray(prep.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(prep.std, dtype=np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


class _Normalized:
    """A lazy view that normalizes what it is indexed with (images decode on demand)."""

    def __init__(self, raw: Any, prep: Preprocessing | None) -> None:
        self._raw, self._prep = raw, prep

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: Any) -> np.ndarray:
        return normalize(self._raw[index], self._prep)


class ArraySource:
    """Images held as arrays (idx, cifar10, npz, image shards), memory-mapped where the format allows.

    Args:
        spec: where they came from.
        x: (N, C, H, W) raw inputs: uint8 pixels (scaled by 1/255 on read) or floats (kept).
        labels: (N,) integer labels.
    """

    task = "classification"

    def __init__(self, spec: DataSpec, x: np.ndarray, labels: np.ndarray, problems: Sequence[str] = ()) -> None:
        if x.ndim == 3:  # (N, H, W): one channel
            x = x[:, None, :, :]
        if x.ndim != 4 or labels.ndim != 1 or len(x) != len(labels):
            raise DataError(f"{spec.path}: inputs {x.shape} and labels {labels.shape} are not (N, C, H, W) and (N,)")
        if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0):
            raise DataError(f"{spec.path}: labels must be non-negative integers, got {labels.dtype}")
        self.spec, self._x, self._labels = spec, x, labels.astype(np.int64)
        self._problems = list(problems)
        self._report: DataReport | None = None

    def _raw(self, index: Any, dtype: type = np.float32) -> np.ndarray:
        part = self._x[index]
        return part.astype(dtype) / 255.0 if part.dtype == np.uint8 else part.astype(dtype)

    def report(self) -> DataReport:
        if self._report is None:
            stats = ChannelStats(count=0, mean=[0.0] * self._x.shape[1], m2=[0.0] * self._x.shape[1])
            for start in range(0, len(self._x), 4096):
                stats = merge_stats(stats, channel_stats(self._raw(slice(start, start + 4096), np.float64)))
            values, counts = np.unique(self._labels, return_counts=True)
            classes = {str(int(v)): int(c) for v, c in zip(values, counts)}
            self._report = DataReport(
                format=self.spec.format,
                task="classification",
                n_samples=len(self._labels),
                sample_shape=[int(d) for d in self._x.shape[1:]],
                channel_stats=stats,
                class_counts=classes,
                problems=_trim(self._problems + _class_problems(classes)),
                fatal="" if len(self._labels) else "no samples",
            )
        return self._report

    def arrays(self, prep: Preprocessing | None) -> tuple[Any, Any]:
        index = _label_index(prep)
        labels = self._labels
        if index is not None:
            try:
                labels = np.asarray([index[str(int(v))] for v in labels], dtype=np.int64)
            except KeyError as exc:
                raise DataError(f"label {exc.args[0]} is not one of the run's classes {list(index)}") from None
        return _Normalized(_RawImages(self), prep), labels


class _RawImages:
    def __init__(self, source: ArraySource) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source._labels)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._source._raw(index)


class ImageFolderSource:
    """A folder of class subfolders of image files, decoded lazily through Pillow.

    Only the file list and labels stay in memory; a batch decodes its files
    when it is indexed, so a board holds a data set larger than its memory.
    Files Pillow cannot decode are found while computing the statistics and
    left out, each with a reason.
    """

    task = "classification"

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self._problems: list[str] = []
        self._files: list[Path] = []
        self._names: list[str] = []
        for folder in sorted(p for p in spec.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                self._problems.append(f"class folder {folder.name!r} holds no image files ({sorted(IMAGE_SUFFIXES)})")
                continue
            self._files.extend(files)
            self._names.extend([folder.name] * len(files))
        self._report: DataReport | None = None

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        size = self.spec.image_size
        try:
            with Image.open(path) as image:
                image.load()
                converted = image.convert("L" if self.spec.channels == 1 else "RGB")
                resized = converted.resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        pixels = np.asarray(resized, dtype=np.uint8)
        return pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def _scan(self) -> None:
        """Decode every image once (in chunks): the statistics, and the files that do not decode."""
        kept_files, kept_names = [], []
        stats = ChannelStats(count=0, mean=[0.0] * self.spec.channels, m2=[0.0] * self.spec.channels)
        for start in range(0, len(self._files), STATS_CHUNK):
            chunk = []
            for path, name in zip(self._files[start : start + STATS_CHUNK], self._names[start : start + STATS_CHUNK]):
                try:
                    chunk.append(self._decode(path))
                except DataError as exc:
                    self._problems.append(f"skipped: {exc}")
                    continue
                kept_files.append(path)
                kept_names.append(name)
            if chunk:
                stats = merge_stats(stats, channel_stats(np.stack(chunk) / 255.0))  # float64
        self._files, self._names = kept_files, kept_names
        classes = dict(sorted(collections.Counter(self._names).items()))
        fatal = "" if self._files else f"no readable image in {self.spec.path} (class subfolders of image files)"
        self._report = DataReport(
            format="images",
            task="classification",
            n_samples=len(self._files),
            sample_shape=[self.spec.channels, self.spec.image_size, self.spec.image_size],
            channel_stats=stats,
            class_counts=classes,
            problems=_trim(self._problems + _class_problems(classes)),
            fatal=fatal,
        )

    def report(self) -> DataReport:
        if self._report is None:
            self._scan()
        assert self._report is not None
        return self._report

    def arrays(self, prep: Preprocessing | None) -> tuple[Any, Any]:
        self.report()  # drops the files that do not decode
        index = _label_index(prep)
        if index is None:
            names = sorted(set(self._names))
            if prep is not None and all(_numeric(n) for n in names):
                index = {n: int(n) for n in names}  # the run keeps integer labels (`combine_reports`: classes = [])
            else:
                index = {n: i for i, n in enumerate(names)}
        try:
            labels = np.asarray([index[name] for name in self._names], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"class {exc.args[0]!r} is not one of the run's classes {list(index)}") from None
        return _Normalized(_LazyImages(self), prep), labels


class _LazyImages:
    def __init__(self, source: ImageFolderSource) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source._files)

    def __getitem__(self, index: Any) -> np.ndarray:
        files = self._source._files
        picked = [files[int(i)] for i in np.atleast_1d(np.arange(len(files))[index])]
        if not picked:
            spec = self._source.spec
            return np.zeros((0, spec.channels, spec.image_size, spec.image_size), dtype=np.float32)
        return np.stack([self._source._decode(p) for p in picked]).astype(np.float32) / 255.0


class TextSource:
    """UTF-8 text (one file or a folder of them) for the char-LM: windows cut once the vocabulary is known.

    Files that are not UTF-8 are skipped with a reason. Windows never cross
    files; each file gives (len - 1) // context non-overlapping windows of
    `context` characters, targets shifted by one.
    """

    task = "lm"

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self._problems: list[str] = []
        paths = (
            [spec.path]
            if spec.path.is_file()
            else sorted(p for p in spec.path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        )
        self._texts: list[str] = []
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                self._problems.append(f"skipped {path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            except OSError as exc:
                self._problems.append(f"skipped {path}: {exc}")
                continue
            if text:
                self._texts.append(text)
            else:
                self._problems.append(f"skipped {path}: empty")
        self._report: DataReport | None = None

    def report(self) -> DataReport:
        if self._report is None:
            counts: collections.Counter[str] = collections.Counter()
            for text in self._texts:
                counts.update(text)
            chars = sum(counts.values())
            self._report = DataReport(
                format="text",
                task="lm",
                n_samples=chars,
                sample_shape=[],
                char_counts=dict(sorted(counts.items())),
                problems=_trim(self._problems),
                fatal="" if chars > 1 else f"no readable UTF-8 text in {self.spec.path}",
            )
        return self._report

    def texts(self) -> list[str]:
        """The readable files' text, in path order."""
        return list(self._texts)

    def encoded(self, vocab: str) -> list[np.ndarray]:
        """Each file's character ids under `vocab` (out-of-vocabulary characters get id len(vocab))."""
        ids = {ch: i for i, ch in enumerate(vocab)}
        oov = len(vocab)
        return [np.fromiter((ids.get(ch, oov) for ch in text), dtype=np.int64, count=len(text)) for text in self._texts]

    def arrays(self, prep: Preprocessing | None) -> tuple[Any, Any]:
        if prep is None or not prep.vocab or prep.context < 1:
            raise DataError("text needs the run's vocabulary and window length (the coordinator sends them)")
        x, y = windows(self.encoded(prep.vocab), prep.context)
        if not len(x):
            raise DataError(f"{self.spec.path}: no text of more than {prep.context} characters")
        return x, y


def windows(texts: Iterable[np.ndarray], context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (input, next-character) windows of `context` ids per text, never crossing texts."""
    xs, ys = [], []
    for ids in texts:
        if len(ids) < context + 1:
            continue
        starts = np.arange(0, len(ids) - context, context)
        offsets = starts[:, None] + np.arange(context)[None, :]
        xs.append(ids[offsets])
        ys.append(ids[offsets + 1])
    if not xs:
        empty = np.zeros((0, context), dtype=np.int64)
        return empty, empty.copy()
    return np.concatenate(xs), np.concatenate(ys)


class EncodedSource:
    """A shard of already-encoded LM windows (Shakespeare's, from `msfusion partition`): used as stored."""

    task = "lm"

    def __init__(self, spec: DataSpec, x: np.ndarray, y: np.ndarray) -> None:
        self.spec, self._x, self._y = spec, x, y

    def report(self) -> DataReport:
        return DataReport(
            format="shard",
            task="lm",
            n_samples=int(self._x.size),
            sample_shape=[int(d) for d in self._x.shape[1:]],
            encoded=True,
            fatal="" if len(self._x) else "no samples",
        )

    def arrays(self, prep: Preprocessing | None) -> tuple[Any, Any]:
        return self._x, self._y


def open_source(spec: DataSpec) -> Source:
    """Open the data `spec` names (statistics are computed on the first `report()`).

    Raises:
        DataError: a missing path, an unknown or unreadable format (with the reason).
    """
    fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
    if not spec.path.exists():
        raise DataError(f"data path {spec.path} does not exist")
    resolved = DataSpec(spec.path, fmt, spec.split, spec.channels, spec.image_size)
    if fmt == "images":
        if not spec.path.is_dir():
            raise DataError(f"{spec.path}: an image data set is a folder of class subfolders")
        return ImageFolderSource(resolved)
    if fmt == "text":
        return TextSource(resolved)
    if fmt == "idx":
        prefix = "train" if spec.split == "train" else "t10k"
        images = idx_array(spec.path, f"{prefix}-images-idx3-ubyte")
        labels = np.asarray(idx_array(spec.path, f"{prefix}-labels-idx1-ubyte"))
        return ArraySource(resolved, images, labels)
    if fmt == "cifar10":
        root = spec.path / "cifar-10-batches-bin" if (spec.path / "cifar-10-batches-bin").is_dir() else spec.path
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] if spec.split == "train" else ["test_batch.bin"]
        parts = [read_cifar_records(root / n) for n in names if (root / n).is_file()]
        if not parts:
            raise DataError(f"{root}: no CIFAR-10 batch of the {spec.split} split ({', '.join(names)})")
        images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ArraySource(resolved, images, labels)
    if fmt == "npz":
        try:
            with np.load(spec.path, allow_pickle=False) as archive:
                if "x" not in archive.files or "y" not in archive.files:
                    raise DataError(f"{spec.path}: expected arrays 'x' and 'y', found {sorted(archive.files)}")
                x, y = archive["x"], archive["y"]
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{spec.path}: not a readable .npz file ({exc})") from exc
        return ArraySource(resolved, x, y)
    # shard
    x, y, meta = read_shard(spec.path)
    if meta.task == "lm":
        return EncodedSource(resolved, x, y)
    return ArraySource(resolved, x, y)


# ---------------------------------------------------------------- agreeing on the run's preprocessing


@dataclass(frozen=True)
class ModelInputs:
    """What the run's model takes (from its `ModelConfig`), to check reports against."""

    task: str
    sample_shape: tuple[int, ...] = ()  # (C, H, W) for images
    num_classes: int = 0
    vocab_size: int = 0
    context: int = 0


def check_report(report: DataReport, model: ModelInputs) -> str:
    """Why a device's data cannot train the run's model ("" when it can)."""
    if report.fatal:
        return report.fatal
    if report.task != model.task:
        return f"the device holds {report.task} data ({report.format}), the run's model trains {model.task}"
    if model.task == "classification":
        if tuple(report.sample_shape) != model.sample_shape:
            c, h, w = model.sample_shape
            return (
                f"the device's images are {'x'.join(map(str, report.sample_shape))} (channels x height x width), "
                f"the model takes {c}x{h}x{w}: set [data] channels = {c} and image_size = {h} on the device"
            )
        if len(report.class_counts) > model.num_classes:
            return f"the device holds {len(report.class_counts)} classes, the model has {model.num_classes} outputs"
        stats = report.channel_stats
        if stats is not None and stats.count:
            if len(stats.mean) != model.sample_shape[0]:
                return f"the device's pixel statistics have {len(stats.mean)} channels, the model takes {model.sample_shape[0]}"
            if not all(math.isfinite(v) for v in (*stats.mean, *stats.m2)) or min(stats.m2) < 0:
                return "the device's pixel statistics are not finite (or a sum of squares is negative)"
    if model.task == "lm" and report.encoded and tuple(report.sample_shape) != (model.context,):
        return f"the device's encoded windows are {report.sample_shape}, the model's context is {model.context}"
    return ""


def _numeric(name: str) -> bool:
    """Whether a class name is an integer label: ASCII digits only (`str.isdigit` also takes '²', which `int` refuses)."""
    return name.isascii() and name.isdigit()


def _class_order(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    if all(_numeric(n) for n in names):
        return sorted(names, key=int)
    return names


def combine_reports(
    reports: Sequence[DataReport],
    model: ModelInputs,
    pinned: Preprocessing | None = None,
) -> Preprocessing:
    """The run's preprocessing from the devices' reports, pinned values winning.

    Images: mean and std per channel of the pooled pixels (exact: pairwise
    updates in float64); classes in label order (numeric names by value, else
    sorted; integer labels keep their value when every name is a number below
    `num_classes`). Text: the `vocab_size - 1` most frequent characters of the
    pooled counts (ties by character), the last id for everything else.

    Raises:
        DataError: no usable report, or more classes than the model has outputs.
    """
    usable = [r for r in reports if not check_report(r, model)]
    pinned = pinned or Preprocessing()
    if model.task == "lm":
        if pinned.vocab or (usable and all(r.encoded for r in usable)):
            return Preprocessing(vocab=pinned.vocab, context=model.context)
        counts: collections.Counter[str] = collections.Counter()
        for r in usable:
            counts.update(r.char_counts)
        if not counts:
            raise DataError("no device reported any text to build the vocabulary from")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: model.vocab_size - 1]
        return Preprocessing(vocab="".join(sorted(ch for ch, _ in ranked)), context=model.context)
    if not usable:
        raise DataError("no device holds data the model can train on")
    mean, std = list(pinned.mean), list(pinned.std)
    if not mean:
        stats = ChannelStats(count=0, mean=[0.0] * model.sample_shape[0], m2=[0.0] * model.sample_shape[0])
        for r in usable:
            if r.channel_stats is not None:
                stats = merge_stats(stats, r.channel_stats)
        if not stats.count:
            raise DataError("no device reported pixel statistics")
        if not all(math.isfinite(v) for v in (*stats.mean, *stats.m2)):
            raise DataError("the devices' pooled pixel statistics overflow (a device reported values far out of range)")
        mean = stats.mean
        std = [max(math.sqrt(m2 / stats.count), 1e-6) for m2 in stats.m2]
    classes = list(pinned.classes) or _class_order(n for r in usable for n in r.class_counts)
    if all(_numeric(c) for c in classes) and not pinned.classes:
        if max(int(c) for c in classes) >= model.num_classes:
            raise DataError(f"label {max(int(c) for c in classes)} is out of range for {model.num_classes} outputs")
        classes = []  # integer labels: kept as they are
    elif len(classes) > model.num_classes:
        raise DataError(f"the fleet holds {len(classes)} classes {classes}, the model has {model.num_classes} outputs")
    return Preprocessing(mean=mean, std=std, classes=classes)


def materialize(source: Source, prep: Preprocessing | None, chunk: int = 1024) -> ArrayDataset:
    """A source read whole (decoded a chunk at a time), as the model takes it: evaluation sets, the reference engine."""
    x, y = source.arrays(prep)
    parts = [np.asarray(x[np.arange(i, min(i + chunk, len(x)))]) for i in range(0, len(x), chunk)]
    if not parts:
        raise DataError(f"{source.spec.path}: no samples")
    return ArrayDataset(np.concatenate(parts), np.asarray(y))


def read_whole(spec: DataSpec, prep: Preprocessing | None = None) -> tuple[ArrayDataset, DataReport]:
    """Open, report and read a data set whole (the coordinator's own copies: partitioning, evaluation)."""
    source = open_source(spec)
    report = source.report()
    for problem in report.problems:
        log.warning("%s: %s", spec.path, problem)
    if report.fatal:
        raise DataError(f"{spec.path}: {report.fatal}")
    return materialize(source, prep), report
