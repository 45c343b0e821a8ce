"""Fuzzing at scale: the fuzz tests under a larger hypothesis budget, with the cases run per target and the crashes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz.py [--profile bench|ci] [--json out.json] [-- pytest args]

Runs tests/msfusion/wire/test_fuzz.py (every decoder, the chunk reassembler,
the device config, data reports) and tests/msfusion/algorithm/test_merge_fuzz.py
(malformed slices in the merge) with MSFUSION_FUZZ_PROFILE set (`bench`: 20x
the CI budget of over 10,000 examples; see tests/fuzzing.py), in one pytest
process. Prints, per target, the examples that actually ran and how they
ended (rejected with a documented error, accepted as valid, ...), then the
crashes: fuzz tests that failed, each an input that raised an undocumented
exception, hung, allocated by a lying size or broke the target's contract
(the failing example is in pytest's output). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/msfusion/wire/test_fuzz.py", "tests/msfusion/algorithm/test_merge_fuzz.py"]
DETAIL_TARGETS = ("merge.malformed_slices.refusals",)  # counted per malformed slice, not per example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["bench", "ci"], default="bench")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k bulk)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "counts.json"
        junit_path = Path(scratch) / "junit.xml"
        env = {**os.environ, "MSFUSION_FUZZ_PROFILE": args.profile, "MSFUSION_FUZZ_REPORT": str(report_path)}
        env.setdefault("OMP_NUM_THREADS", "1")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit_path}"]
        started = time.perf_counter()
        rc = subprocess.call([*command, *TESTS, *args.pytest_args], cwd=ROOT, env=env)
        wall_s = time.perf_counter() - started
        counts = json.loads(report_path.read_text()) if report_path.exists() else {}
        crashes = _failures(junit_path)
    cases = {target: sum(outcomes.values()) for target, outcomes in counts.items() if target not in DETAIL_TARGETS}
    print(f"\nfuzz profile {args.profile}: {sum(cases.values())} cases in {wall_s:.0f} s, {len(crashes)} crashes\n")
    width = max((len(t) for t in counts), default=10)
    for target, outcomes in sorted(counts.items()):
        spread = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        unit = "slices" if target in DETAIL_TARGETS else "cases"
        print(f"  {target:<{width}}  {sum(outcomes.values()):>7} {unit}  ({spread})")
    for name, message in crashes:
        print(f"  CRASH {name}: {message}")
    if args.json:
        figures = {
            "profile": args.profile,
            "cases": sum(cases.values()),
            "wall_s": round(wall_s, 1),
            "crashes": [{"test": n, "message": m} for n, m in crashes],
            "targets": counts,
        }
        args.json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    return rc


def _failures(junit_path: Path) -> list[tuple[str, str]]:
    """(test id, first line of its failure) for every failed or erroring test in a JUnit XML report."""
    if not junit_path.exists():
        return [("pytest", "no report: pytest did not run")]
    out = []
    for case in ET.parse(junit_path).iter("testcase"):
        for problem in [*case.iter("failure"), *case.iter("error")]:
            message = (problem.get("message") or "").splitlines()
            out.append((f"{case.get('classname')}::{case.get('name')}", message[0][:200] if message else ""))
    return out


if __name__ == "__main__":
    sys.exit(main())
