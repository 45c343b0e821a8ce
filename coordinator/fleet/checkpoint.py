"""Checkpoints: the global weights (safetensors) plus the run's JSON state, resumable bit for bit.

A checkpoint holds everything the next round depends on and nothing drawn
from an RNG: the global weights, the next round's index, the last merged
round's overlap target and disagreement (the next round adapts from them), the
co-hold counts of the merged slices (float64, for the deployable model), and the run's session id
(task ids are derived from it, so a resumed coordinator asks the same
questions and devices answer redelivered tasks from their records).

Crash safety: the weights go to a new file per round (`global-rNNNNN.safetensors`),
then `state.json` is atomically replaced to name that file and its sha256,
then older weights files are removed. A crash at any point leaves a
`state.json` whose weights file exists and matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import numpy.typing as npt
import safetensors.numpy

from msfusion.algorithm.slicing import Weights
from msfusion.atomic import atomic_write
from msfusion.errors import ArtifactError, ConfigError
from msfusion.wire.weights import pack_weights, unpack_weights

WEIGHTS_PATTERN = "global-r{round:05d}.safetensors"
COHOLD_PATTERN = "cohold-r{round:05d}.safetensors"
STATE_FILE = "state.json"
FORMAT = "msfusion-checkpoint-2"  # 2: overlap is the last merged target; co-hold counts


@dataclass(frozen=True)
class RunState:
    """The coordinator's state between rounds (everything but the weights).

    Attributes:
        run_id: the run.
        session: random id fixed at the run's start; prefixes every task id.
        next_round: the round to run next (rounds before it are merged).
        overlap: the overlap target of the last merged round (the initial one before the first);
            the next round adapts it from `disagreement` (`algorithm.overlap.next_overlap`).
        disagreement: measured at the last merge (None before the first).
        backend: the artifact kind of the run.
        negatives: per device, the task whose slice was merged in the last merged round it had one in:
            its next task names that slice as its contrastive negative (a slice of a discarded attempt never).
    """

    run_id: str
    session: str
    next_round: int
    overlap: float
    disagreement: float | None
    backend: str
    negatives: Mapping[str, str] = field(default_factory=dict)


def weights_digest(weights: Mapping[str, npt.NDArray[np.float32]]) -> str:
    """sha256 over every tensor's name, shape and float32 bytes, in name order (bit-exact identity)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name], dtype="<f4")
        h.update(f"{name}\0{list(array.shape)}\0".encode())
        h.update(array.view(np.uint8).data)
    return h.hexdigest()


def save_checkpoint(
    folder: Path,
    weights: Mapping[str, npt.NDArray[np.float32]],
    state: RunState,
    cohold: Mapping[str, npt.NDArray[np.float64]] | None = None,
) -> None:
    """Write weights (and the co-hold counts) then state, each atomically.

    Args:
        folder: the checkpoint folder (created if missing).
        weights: the global weights after the last merged round.
        state: the run state for the next round.
        cohold: `CoHoldStats.state()`, so a resumed run's deployable model is the uninterrupted run's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = pack_weights(weights)
    name = WEIGHTS_PATTERN.format(round=state.next_round)
    atomic_write(folder / name, data)
    record: dict[str, object] = {
        "format": FORMAT,
        "weights_file": name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        **asdict(state),
    }
    keep = {name}
    if cohold is not None:
        counts = safetensors.numpy.save({k: np.ascontiguousarray(v, np.float64) for k, v in sorted(cohold.items())})
        cohold_name = COHOLD_PATTERN.format(round=state.next_round)
        atomic_write(folder / cohold_name, counts)
        record["cohold_file"], record["cohold_sha256"] = cohold_name, hashlib.sha256(counts).hexdigest()
        keep.add(cohold_name)
    atomic_write(folder / STATE_FILE, json.dumps(record, indent=2).encode("utf-8"))
    for old in [*folder.glob("global-r*.safetensors"), *folder.glob("cohold-r*.safetensors")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def load_cohold(folder: Path) -> dict[str, npt.NDArray[np.float64]] | None:
    """The co-hold counts the last checkpoint saved (None: it saved none).

    Raises:
        ArtifactError: a counts file that does not match the state file.
    """
    record = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if "cohold_file" not in record:
        return None
    path = folder / Path(record["cohold_file"]).name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"checkpoint co-hold counts {path} are unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != record["cohold_sha256"]:
        raise ArtifactError(f"{path} does not match {folder / STATE_FILE}")
    return dict(safetensors.numpy.load(data))


def load_checkpoint(folder: Path) -> tuple[Weights, RunState]:
    """Read a checkpoint back exactly as it was saved.

    Raises:
        ConfigError: no checkpoint in `folder`.
        ArtifactError: a malformed state file, or weights that do not match it.
    """
    state_path = folder / STATE_FILE
    if not state_path.exists():
        raise ConfigError(f"no checkpoint in {folder} (nothing to resume)")
    try:
        record = json.loads(state_path.read_text(encoding="utf-8"))
        if record.pop("format") != FORMAT:
            raise ArtifactError(f"{state_path}: not a {FORMAT} file")
        sha = record.pop("weights_sha256")
        record.pop("cohold_file", None)
        record.pop("cohold_sha256", None)
        weights_path = folder / Path(record.pop("weights_file")).name
        state = RunState(**record)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{state_path} is malformed: {exc}") from exc
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"checkpoint weights {weights_path} are unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha:
        raise ArtifactError(f"{weights_path} does not match {state_path}")
    return unpack_weights(data), state
