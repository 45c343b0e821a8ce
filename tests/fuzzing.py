"""What the fuzz tests share: hypothesis profiles, example counters, a hang guard, byte mutations.

tests/ is on sys.path through tests/conftest.py (as for memory_limits.py).

Profiles (``MSFUSION_FUZZ_PROFILE``): "ci" (the default: over 10,000 examples
across all fuzz tests, well under two minutes on two cores) and "bench"
(`BENCH_SCALE` times as many; `bench/fuzz.py`). Both are derandomized, so a
failure reproduces, and keep no example database. The profiles are not
loaded globally: other hypothesis tests keep their own settings.

Every test body calls `record(target, case, outcome)` once per example, so
the figures reported are the examples that actually ran. With
``MSFUSION_FUZZ_REPORT=path`` the counts are written there as JSON at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import math
import os
import random
import signal
import tracemalloc
from typing import Any, Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

BENCH_SCALE = 20
PROFILE_NAME = os.environ.get("MSFUSION_FUZZ_PROFILE", "ci")
if PROFILE_NAME not in ("ci", "bench"):
    raise ValueError(f"MSFUSION_FUZZ_PROFILE must be 'ci' or 'bench', got {PROFILE_NAME!r}")
SCALE = BENCH_SCALE if PROFILE_NAME == "bench" else 1

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("bench", parent=settings.get_profile("ci"), max_examples=100 * BENCH_SCALE)
PROFILE = settings.get_profile(PROFILE_NAME)

# (target, case) -> outcome -> examples run
COUNTS: collections.defaultdict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)
BUDGETS: dict[str, int] = {}  # target -> examples asked for, per case


def fuzz(target: str, examples: int) -> settings:
    """The settings of one fuzz target: the profile with `examples` (scaled by the profile) per case."""
    BUDGETS[target] = examples * SCALE
    return settings(PROFILE, max_examples=examples * SCALE)


def record(target: str, case: str, outcome: str) -> None:
    """Count one example of `target` (`case`: the parametrized variant) that ended in `outcome`."""
    COUNTS[(target, case)][outcome] += 1


def shortfalls(prefix: str) -> list[str]:
    """Cases of the targets starting with `prefix` that ran fewer examples than their budget."""
    return [
        f"{target}[{case}]: {sum(outcomes.values())} < {BUDGETS[target]}"
        for (target, case), outcomes in COUNTS.items()
        if target.startswith(prefix) and target in BUDGETS and sum(outcomes.values()) < BUDGETS[target]
    ]


def summary(prefix: str = "") -> dict[str, dict[str, int]]:
    """target -> outcome -> examples, summed over cases (targets starting with `prefix`)."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (target, _case), outcomes in COUNTS.items():
        if target.startswith(prefix):
            out[target].update(outcomes)
    return {target: dict(outcomes) for target, outcomes in sorted(out.items())}


def _write_report() -> None:
    path = os.environ.get("MSFUSION_FUZZ_REPORT")
    if not path or not COUNTS:
        return
    try:
        with open(path, encoding="utf-8") as handle:
            report: dict[str, Any] = json.load(handle)
    except (OSError, ValueError):
        report = {}
    for target, outcomes in summary().items():
        merged = collections.Counter(report.get(target, {}))
        merged.update(outcomes)
        report[target] = dict(merged)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, sort_keys=True)


atexit.register(_write_report)


class Hang(BaseException):
    """Raised into code that ran past its time limit (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def no_hang(seconds: float = 10.0) -> Iterator[None]:
    """Fail with `Hang` if the block runs longer than `seconds` (SIGALRM: main thread only)."""

    def _alarm(signum: int, frame: Any) -> None:
        raise Hang(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def bounded_memory(limit_bytes: int) -> Iterator[None]:
    """Fail if the block's Python and numpy allocations peak above `limit_bytes` (tracemalloc).

    Catches a buffer sized by a lying length field before it grows large: the
    peak is checked after the block, so keep what a lying field could ask for
    small, or cap it in the code under test.
    """
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if peak > limit_bytes:
        raise AssertionError(f"allocated {peak} bytes, more than the {limit_bytes} its input justifies")


# Byte mutations: what a flaky link, a truncating broker or a hostile peer makes of a message.

# Bytes that mean something to MessagePack, JSON, tar and safetensors: lengths, markers, extremes.
_INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xc0",
    b"\xc1",
    b"\xc3",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # msgpack uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # msgpack int64 min
    b"\xdb\xff\xff\xff\xff",  # msgpack str32 of 4 GiB
    b"\xc6\x7f\xff\xff\xff",  # msgpack bin32 of 2 GiB
    b"\xdd\xff\xff\xff\xff",  # msgpack array32 of 4 G elements
    b"\xdf\xff\xff\xff\xff",  # msgpack map32 of 4 G entries
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # msgpack float64 NaN
    b"\x91" * 64,  # nested arrays
    b"[" * 64,
    b"{",
    b'"',
    b"\\u0000",
    b"1e999",
    b"-0",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",  # a little-endian u64 length of 2**64 - 1
]


# Bulk randomness comes from a `random.Random` seeded by one hypothesis draw: hypothesis draws are
# exact to reproduce but cost tens of microseconds each, and a mutated message or a junk tree takes
# hundreds of them. Derandomized seeds reproduce all the same.
SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


def mutate(rng: random.Random, base: bytes, max_ops: int = 4) -> bytes:
    """`base` after 1..`max_ops` random edits: bit flips, truncation, extension, insertion, deletion, splices."""
    data = bytearray(base)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.choice(["flip", "set", "truncate", "extend", "insert", "delete", "duplicate", "splice"])
        at = rng.randint(0, len(data))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == "set" and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == "truncate":
            del data[at:]
        elif op == "extend":
            data += rng.randbytes(rng.randint(1, 64))
        elif op == "insert":
            data[at:at] = rng.choice(_INTERESTING) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del data[at : at + rng.randint(1, 16)]
        elif op == "duplicate":
            data[at:at] = data[at : at + rng.randint(1, 64)]
        else:  # overwrite a run with an interesting value
            value = rng.choice(_INTERESTING)
            data[at : at + len(value)] = value
    return bytes(data)


def mutated(base: bytes, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """`base` randomly edited (see `mutate`)."""
    return SEEDS.map(lambda seed: mutate(random.Random(seed), base, max_ops))


# Values of the wrong type for any field: what a confused or hostile peer sends.
_INTS = [0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
_FLOATS = [0.0, -0.0, 1e-320, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5, 1.0 + 2**-52]
_TEXTS = ["", " ", "\x00", "../x", "a/b", "+", "#", "$SYS", "\n", "é", "²", "٣", "x" * 300, "\ud7ff", "😀"]


def scalar(rng: random.Random, json_safe: bool = False) -> Any:
    """One junk scalar: None, a bool, an extreme or random int, float or string, or bytes (unless `json_safe`)."""
    kind = rng.randrange(8 if json_safe else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(_INTS)
    if kind == 3:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 4:
        return rng.choice(_FLOATS)
    if kind == 5:
        return rng.uniform(-1e6, 1e6)
    if kind == 6:
        return rng.choice(_TEXTS)
    if kind == 7:
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0xD7FF)])) for _ in range(rng.randint(0, 12))
        )
    return rng.randbytes(rng.randint(0, 20))


def junk(rng: random.Random, json_safe: bool = False, depth: int = 0) -> Any:
    """A junk value: a scalar, or lists and maps of junk up to three deep."""
    kind = rng.randrange(6) if depth < 3 else 0
    if kind <= 3:
        return scalar(rng, json_safe)
    if kind == 4:
        return [junk(rng, json_safe, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(scalar(rng, True)): junk(rng, json_safe, depth + 1) for _ in range(rng.randint(0, 4))}


SCALARS = SEEDS.map(lambda seed: scalar(random.Random(seed), json_safe=True))
JUNK = SEEDS.map(lambda seed: junk(random.Random(seed)))
JSON_JUNK = SEEDS.map(lambda seed: junk(random.Random(seed), json_safe=True))  # what JSON carries (no bytes)
