"""Typed errors shared by every part of msfusion (torch-free)."""


class MsfusionError(Exception):
    """Base of every error msfusion raises on purpose."""


class ConfigError(MsfusionError):
    """A configuration value is missing, malformed or inconsistent."""


class ProtocolError(MsfusionError):
    """A message could not be decoded or failed validation."""


class ArtifactError(MsfusionError):
    """A training artifact is missing, corrupt, or failed validation."""


class MemoryBudgetExceeded(MsfusionError):
    """Training would exceed (or exceeded) the device's memory budget."""

    def __init__(self, message: str, *, peak_bytes: int = 0, budget_bytes: int = 0) -> None:
        super().__init__(message)
        self.peak_bytes = peak_bytes
        self.budget_bytes = budget_bytes


class DeviceLost(MsfusionError):
    """A device went offline or missed its deadline."""


class InvalidSlice(MsfusionError):
    """A returned weight slice was rejected (non-finite, wrong shape, wrong round, duplicate)."""


class DataError(MsfusionError):
    """A data set file is missing or malformed."""


class BundleError(MsfusionError):
    """A device bundle could not be built or installed (download failed, wrong wheel, bad bundle)."""
