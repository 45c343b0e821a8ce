"""Training artifacts as the device sees them: kind, manifest, checksums, packing (torch-free).

An artifact is a directory of files (ONNX Runtime Training graphs and a
nominal checkpoint, one ExecuTorch program, or one torch.export program) plus `manifest.json`, which
names every file with its sha256 and size and describes the tensors the graph
expects. The graph depends only on the sub-model's shape, the loss and the
optimizer: weights never live in an artifact, they travel separately
(`msfusion/wire/weights.py`) and are set with `TrainingBackend.set_weights`.

Tensor names: trainable tensors carry the spec's names (`blocks.0.conv.weight`);
the frozen references of the contrastive term carry the spec's names behind
`global_ref.` or `prev_ref.`. Inside a graph every spec name sits behind
`param_prefix`; the backends map names both ways.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.slicing import Weights
from msfusion.errors import ArtifactError, ConfigError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
GLOBAL_REF_PREFIX = "global_ref."
PREV_REF_PREFIX = "prev_ref."
_MAX_FILES = 64


class ArtifactKind(str, enum.Enum):
    """Which runtime trains an artifact (the values are the wire names)."""

    ORT = "ort"  # ONNX Runtime Training: training/eval/optimizer graphs + checkpoint
    EXECUTORCH = "executorch"  # one ExecuTorch program with a joint forward-backward method
    TORCH = "torch"  # one torch.export program (.pt2) of the loss, trained with torch's own kernels and autograd


@dataclass(frozen=True)
class OptimizerConfig:
    """The local optimizer an artifact implements (the same one the reference engine uses).

    Attributes:
        name: "sgd" (heavy-ball momentum, as torch.optim.SGD) or "adamw" (as torch.optim.AdamW).
        momentum: SGD momentum (0 = plain SGD).
        weight_decay: SGD L2 term added to the gradient, or AdamW's decoupled decay.
        betas: AdamW's moment decays.
        eps: AdamW's denominator epsilon.
        scaler_compensation: SGD only: multiply the gradient of every weight
            whose layer scales its input by the scaler s (K/k) by 1/s, so a
            sub-model trains at the learning rate of the small model it is
            (docs/algorithm.md, "Scaler-compensated SGD"). The factors are in
            the manifest's `grad_scales`.
    """

    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scaler_compensation: bool = True

    @property
    def compensates(self) -> bool:
        """Whether scaled weights' gradients are multiplied by 1/s (SGD with compensation on)."""
        return self.name == "sgd" and self.scaler_compensation

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.name!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0.0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0.0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")

    @classmethod
    def of(cls, optimizer: str | OptimizerConfig) -> OptimizerConfig:
        """`optimizer` itself, or the default configuration of the optimizer it names."""
        return optimizer if isinstance(optimizer, OptimizerConfig) else cls(name=optimizer)


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and numpy dtype name of one tensor an artifact expects."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact: its name inside the directory, sha256 and size."""

    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ArtifactManifest:
    """What an artifact holds and expects; written as `manifest.json` beside its files.

    Attributes:
        kind: the runtime that trains it.
        key: the cache key it was exported under (export/cache.py).
        arch: architecture name (information only).
        files: every file of the artifact, with checksums.
        params: the trainable tensors (spec names), in artifact order.
        frozen: the frozen reference tensors (`global_ref.<spec name>`,
            `prev_ref.<spec name>`) the graph reads, in artifact order; empty
            when the contrastive term is off.
        inputs: the batch inputs `x` and `y` (static shapes: the batch size is fixed).
        optimizer: the optimizer the artifact applies.
        loss: the local objective's knobs: variant, mu, tau.
        param_prefix: graph name of spec tensor n is `param_prefix + n`.
        layout: graph tensor names in the runtime's parameter order (ONNX
            Runtime's contiguous buffer); empty where unused.
        constants: non-trainable graph tensors that are not references (e.g. a
            causal mask), stored in the artifact's constants file.
        versions: the runtime versions it was exported with.
        grad_scales: spec name -> factor the optimizer applies to that
            tensor's gradient (scaler compensation; absent = 1).
        format_version: manifest format.
    """

    kind: ArtifactKind
    key: str
    arch: str
    files: tuple[ArtifactFile, ...]
    params: tuple[TensorInfo, ...]
    frozen: tuple[TensorInfo, ...]
    inputs: tuple[TensorInfo, ...]
    optimizer: OptimizerConfig
    loss: Mapping[str, Any]
    param_prefix: str = ""
    layout: tuple[str, ...] = ()
    constants: tuple[TensorInfo, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)
    grad_scales: Mapping[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def batch_size(self) -> int:
        """Samples per step (the leading axis of `x`)."""
        return self.inputs[0].shape[0]

    def file(self, name: str) -> ArtifactFile:
        """The file called `name`.

        Raises:
            ArtifactError: the artifact has no such file.
        """
        for entry in self.files:
            if entry.name == name:
                return entry
        raise ArtifactError(f"{self.kind.value} artifact {self.key[:12]} has no file {name!r}")

    def to_json(self) -> str:
        """The manifest as JSON text."""
        data = asdict(self)
        data["kind"] = self.kind.value
        data["loss"] = dict(self.loss)
        data["versions"] = dict(self.versions)
        data["grad_scales"] = dict(self.grad_scales)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactManifest:
        """Parse `to_json` output.

        Raises:
            ArtifactError: not JSON, a missing or malformed field, or an unknown format.
        """
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(
                    f"manifest format {data.get('format_version')!r}, this runtime reads {FORMAT_VERSION}"
                )
            return cls(
                kind=ArtifactKind(data["kind"]),
                key=str(data["key"]),
                arch=str(data["arch"]),
                files=tuple(_file_entry(f) for f in data["files"]),
                params=tuple(TensorInfo(**t) for t in data["params"]),
                frozen=tuple(TensorInfo(**t) for t in data["frozen"]),
                inputs=tuple(TensorInfo(**t) for t in data["inputs"]),
                optimizer=OptimizerConfig(**data["optimizer"]),
                loss=dict(data["loss"]),
                param_prefix=str(data["param_prefix"]),
                layout=tuple(str(n) for n in data["layout"]),
                constants=tuple(TensorInfo(**t) for t in data["constants"]),
                versions={str(k): str(v) for k, v in data["versions"].items()},
                grad_scales={str(k): float(v) for k, v in data.get("grad_scales", {}).items()},
                format_version=int(data["format_version"]),
            )
        except ArtifactError:
            raise
        # OverflowError: int() of an infinite size (JSON's 1e999); RecursionError: arrays nested thousands deep.
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError, ConfigError) as exc:
            raise ArtifactError(f"malformed artifact manifest: {exc!r}") from exc


def _file_entry(raw: Mapping[str, Any]) -> ArtifactFile:
    """One `files` entry of a manifest, checked: a plain name in the artifact's one folder, a size, a sha256.

    Raises:
        ArtifactError: a name with a path in it (``../x``, ``/etc/x``), or a size or checksum of the wrong type.
        TypeError: missing or unknown keys (`from_json` reports it).
    """
    entry = ArtifactFile(**raw)
    if not isinstance(entry.name, str) or entry.name in ("", ".", "..", MANIFEST_NAME) or "/" in entry.name:
        raise ArtifactError(f"artifact file name {entry.name!r} is not a plain file name")
    if "\0" in entry.name:
        raise ArtifactError(f"artifact file name {entry.name!r} holds a NUL")
    if type(entry.size_bytes) is not int or entry.size_bytes < 0 or not isinstance(entry.sha256, str):
        raise ArtifactError(
            f"artifact file {entry.name!r}: size {entry.size_bytes!r} or sha256 {entry.sha256!r} malformed"
        )
    return entry


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> tuple[ArtifactFile, ...]:
    """`ArtifactFile` entries (sha256, size) for the named files in `directory`."""
    return tuple(
        ArtifactFile(name, sha256_file(directory / name), (directory / name).stat().st_size) for name in sorted(names)
    )


def write_manifest(directory: Path, manifest: ArtifactManifest) -> Path:
    """Write `manifest.json` into `directory`; returns its path."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def load_manifest(directory: Path, *, verify: bool = True) -> ArtifactManifest:
    """Read an artifact directory's manifest and (by default) check every file against it.

    Args:
        directory: the artifact directory.
        verify: compare every file's size and sha256 with the manifest.

    Returns:
        The manifest.

    Raises:
        ArtifactError: no manifest, a malformed one, a missing file, or a checksum mismatch.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST_NAME} (not an artifact)")
    manifest = ArtifactManifest.from_json(path.read_bytes())
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: ArtifactManifest) -> None:
    """Check that every file of `manifest` is in `directory` with its size and sha256.

    Raises:
        ArtifactError: naming the first missing or corrupt file.
    """
    for entry in manifest.files:
        path = Path(directory) / entry.name
        if not path.is_file():
            raise ArtifactError(f"artifact file {entry.name!r} is missing from {directory}")
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise ArtifactError(
                f"artifact file {entry.name!r} has {size} bytes, the manifest says {entry.size_bytes} (corrupt)"
            )
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"artifact file {entry.name!r} fails its sha256 (corrupt)")


def pack_artifact(directory: Path) -> bytes:
    """One uncompressed tar of a verified artifact: the manifest first, then its files.

    Raises:
        ArtifactError: the directory is not a sound artifact.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in [MANIFEST_NAME] + [entry.name for entry in manifest.files]:
            info = tarfile.TarInfo(name)
            info.size = (directory / name).stat().st_size
            info.mode = 0o644
            with open(directory / name, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def unpack_artifact(data: bytes, destination: Path) -> ArtifactManifest:
    """Unpack `pack_artifact` bytes into `destination` and verify every file.

    Only plain files named by the manifest are written (no links, no paths).

    Args:
        data: the tar bytes.
        destination: directory to write into (created if missing).

    Returns:
        The verified manifest.

    Raises:
        ArtifactError: unreadable bytes, a member the manifest does not name,
            or a file that fails its checksum.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if not members or members[0].name != MANIFEST_NAME or len(members) > _MAX_FILES + 1:
                raise ArtifactError(f"artifact blob does not start with {MANIFEST_NAME}")
            manifest_bytes = _read_member(tar, members[0])
            manifest = ArtifactManifest.from_json(manifest_bytes)
            expected = {entry.name for entry in manifest.files}
            seen = set()
            for member in members[1:]:
                if member.name not in expected or member.name in seen or "/" in member.name:
                    raise ArtifactError(f"artifact blob holds unexpected member {member.name!r}")
                seen.add(member.name)
                (destination / member.name).write_bytes(_read_member(tar, member))
    except tarfile.TarError as exc:
        raise ArtifactError(f"unreadable artifact blob: {exc}") from exc
    (destination / MANIFEST_NAME).write_bytes(manifest_bytes)
    verify_files(destination, manifest)
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    # A sparse member declares its own size, holes included: reading it would allocate whatever it claims.
    if not member.isfile() or member.issparse():
        raise ArtifactError(f"artifact member {member.name!r} is not a plain file")
    handle = tar.extractfile(member)
    if handle is None:
        raise ArtifactError(f"artifact member {member.name!r} is unreadable")
    return handle.read()


def reference_weights(
    manifest: ArtifactManifest,
    global_ref: Mapping[str, npt.NDArray[np.float32]],
    prev_ref: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> Weights:
    """The frozen tensors an artifact reads, from the two reference sub-models.

    Args:
        manifest: the artifact's manifest.
        global_ref: the global sub-model received this round (spec names).
        prev_ref: the previous local sub-model re-sliced to this round's units
            (`indexing.reslice_previous`); None uses `global_ref`.

    Returns:
        `global_ref.<name>` / `prev_ref.<name>` -> array, exactly the manifest's frozen names.

    Raises:
        ArtifactError: a reference lacks a tensor the artifact reads.
    """
    prev_ref = global_ref if prev_ref is None else prev_ref
    out: Weights = {}
    for info in manifest.frozen:
        if info.name.startswith(GLOBAL_REF_PREFIX):
            source, name = global_ref, info.name[len(GLOBAL_REF_PREFIX) :]
        elif info.name.startswith(PREV_REF_PREFIX):
            source, name = prev_ref, info.name[len(PREV_REF_PREFIX) :]
        else:
            raise ArtifactError(f"frozen tensor {info.name!r} is not a reference weight")
        if name not in source:
            raise ArtifactError(f"reference weights lack tensor {name!r} (needed as {info.name!r})")
        out[info.name] = np.asarray(source[name], dtype=np.float32)
    return out


def check_tensors(kind: str, expected: tuple[TensorInfo, ...], given: Mapping[str, Any]) -> None:
    """Check that `given` holds exactly the `expected` names with their shapes.

    Raises:
        ArtifactError: naming the first missing, unexpected or mis-shaped tensor.
    """
    names = {info.name for info in expected}
    missing = sorted(names - set(given))
    if missing:
        raise ArtifactError(f"{kind} weights lack tensor {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(set(given) - names)
    if unexpected:
        raise ArtifactError(f"{kind} weights hold unknown tensor {unexpected[0]!r} ({len(unexpected)} unknown)")
    for info in expected:
        shape = tuple(np.shape(given[info.name]))
        if shape != info.shape:
            raise ArtifactError(f"{kind} tensor {info.name!r} has shape {shape}, the artifact needs {info.shape}")


def check_weights(
    manifest: ArtifactManifest,
    trainable: Mapping[str, npt.NDArray[np.float32]],
    frozen: Mapping[str, npt.NDArray[np.float32]],
) -> None:
    """Check a backend's `set_weights` arguments: exactly the manifest's trainable and frozen tensors.

    Raises:
        ArtifactError: a missing, unexpected or mis-shaped tensor.
    """
    check_tensors("trainable", manifest.params, trainable)
    check_tensors("frozen", manifest.frozen, frozen)


def check_batch(
    manifest: ArtifactManifest, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64]
) -> tuple[TensorInfo, TensorInfo]:
    """Check a backend's `train_step` batch: the artifact's static shapes.

    Returns:
        The artifact's inputs (x, y), whose dtypes the runtime is fed.

    Raises:
        ArtifactError: a batch of another shape.
    """
    x_info, y_info = manifest.inputs
    if tuple(np.shape(x)) != x_info.shape or tuple(np.shape(y)) != y_info.shape:
        raise ArtifactError(
            f"batch shapes {np.shape(x)}, {np.shape(y)} do not fit the artifact's {x_info.shape}, {y_info.shape}"
        )
    return x_info, y_info


def artifact_bytes(manifest: ArtifactManifest) -> int:
    """Total size of an artifact's files, manifest aside."""
    return sum(entry.size_bytes for entry in manifest.files)


def param_count(manifest: ArtifactManifest) -> int:
    """Number of trainable elements."""
    return sum(math.prod(info.shape) for info in manifest.params)
