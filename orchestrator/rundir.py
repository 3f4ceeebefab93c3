"""The run directory's layout (RunPaths) and the writes every part of a run makes in it: whole-file writes that
never show a half-written file, the write errors as sentences, and the run's event log (run.log)."""
from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError
from .sinks import sink_for


@dataclass
class RunPaths:
    """The run directory's paths: where each part of a run reads and writes under root."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def tmp(self) -> Path:
        return self.root / "work" / "tmp"

    @property
    def claims(self) -> Path:
        return self.root / "work" / "claims"

    @property
    def progress(self) -> Path:
        return self.root / "work" / "progress"

    @property
    def requests(self) -> Path:
        """One JSON line per HTTP request: <attempt>-<owner>.jsonl (what `orchestrator status` and `report` read)."""
        return self.root / "work" / "requests"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def result_file(self, unit: int) -> Path:
        return sink_for(self).file(unit)  # the run's output.format names the file

    def make(self) -> None:
        for d in (self.results, self.tmp, self.claims, self.progress, self.requests, self.logs):
            d.mkdir(parents=True, exist_ok=True)


def _write_tmp(path: Path, text: str) -> Path:
    """text in a temporary file beside path; nothing is left behind when the write fails (a full disk)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    return tmp


def write_error(path: Path, exc: OSError) -> RunError:
    """A failed write as a sentence: which file, why, and what to do."""
    fix = "free some space there, or choose another run_dir=" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "check the run directory's permissions, or choose another run_dir="
    return RunError(f"cannot write {path} ({exc.strerror or exc}); {fix}. What was committed before is kept")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _write_tmp(path, text)
    os.replace(tmp, path)


def publish_once(path: Path, text: str) -> bool:
    """Write path whole if nobody has (link is atomic and refuses to replace); False when another process
    published it first."""
    tmp = _write_tmp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def log_event(paths: RunPaths, message: str) -> None:
    """One line in <run_dir>/run.log: what happened to the run, for the person reading it later."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
    with open(paths.root / "run.log", "a") as fh:
        fh.write(line)
