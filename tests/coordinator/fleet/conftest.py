"""Shared fixtures for the fleet tests."""

from __future__ import annotations

import pytest

# The fleet tests (test_fleet*.py) share one partition, one reference run and one artifact cache.


@pytest.fixture(scope="session")
def fleet_shards(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fleet_harness import make_shards

    return make_shards(tmp_path_factory.mktemp("fleet-shards"))


@pytest.fixture(scope="session")
def fleet_reference(fleet_shards):  # type: ignore[no-untyped-def]
    from fleet_harness import reference_weights

    return reference_weights(fleet_shards)


@pytest.fixture(scope="session")
def fleet_artifacts(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fleet_harness import ENGINE

    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts

    return ExportedArtifacts(ENGINE, "ort", cache_dir=tmp_path_factory.mktemp("fleet-artifacts"))
