"""The metadata operations replicas make on the shared run directory, each counted.

On a parallel filesystem (Lustre, GPFS) every open, create, stat, rename, link, unlink, utime and
directory listing is a round trip to the metadata server that the whole cluster shares. The claim,
heartbeat, lease and commit code goes through these functions, so `COUNTS` says what a run cost that
server, and `bench/scale.py` reports it per unit (checked against `strace -e trace=%file` on real
processes: `bench/strace_claims.py`).
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

COUNTS: collections.Counter = collections.Counter()


def total() -> int:
    return sum(COUNTS.values())


def create_exclusive(path: Path, text: str) -> bool:
    """Create path holding text; False when it exists (one create)."""
    COUNTS["create"] += 1
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


def listdir(path: Path) -> list[str]:
    """A directory's names; [] when it does not exist (one listing)."""
    COUNTS["listdir"] += 1
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def mtime(path: Path) -> float | None:
    COUNTS["stat"] += 1
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def exists(path: Path) -> bool:
    return mtime(path) is not None


def read_text(path: Path) -> str | None:
    COUNTS["open"] += 1
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def read_bytes(path: Path) -> bytes | None:
    COUNTS["open"] += 1
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def touch(path: Path, at: float) -> None:
    """Set path's time to at (a heartbeat), creating it the first time."""
    COUNTS["utime"] += 1
    try:
        os.utime(path, (at, at))
    except FileNotFoundError:
        COUNTS["create"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (at, at))


def open_file(path: Path, mode: str):
    COUNTS["open"] += 1
    return open(path, mode)


def replace(src: Path, dst: Path) -> None:
    COUNTS["rename"] += 1
    os.replace(src, dst)


def link(src: Path, dst: Path) -> bool:
    """dst becomes src's file unless dst exists (atomic, never replaces): False when it did exist."""
    COUNTS["link"] += 1
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False


def unlink(path: Path) -> None:
    COUNTS["unlink"] += 1
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
