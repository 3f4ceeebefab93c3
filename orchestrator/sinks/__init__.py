"""Result sinks: how a run's committed units are stored (output.format), behind one interface.

`sink_for(run)` gives the sink of a run directory (a RunPaths, or its root): the format is the one the
run was started with, read from the run directory's config.yaml (`output.format`; a run directory
without the key, written before sinks existed, is Parquet). `SINKS` maps each output.format to its class.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import RESULT_PREFIX, STATS_KEY, ResultSink
from .jsonl_dir import JsonlDirSink
from .openai_batch import OpenAIBatchSink
from .parquet_dir import ParquetDirSink

SINKS: dict[str, type[ResultSink]] = {"parquet": ParquetDirSink, "jsonl": JsonlDirSink, "openai_batch": OpenAIBatchSink}
FORMATS = tuple(SINKS)
DEFAULT_FORMAT = "parquet"

_known: dict[Path, ResultSink] = {}  # run root -> its sink, once config.yaml has said

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "RESULT_PREFIX",
    "SINKS",
    "STATS_KEY",
    "JsonlDirSink",
    "OpenAIBatchSink",
    "ParquetDirSink",
    "ResultSink",
    "format_of",
    "sink_for",
    "sink_of_file",
]


def format_of(root: Path) -> str | None:
    """output.format from a run directory's config.yaml: None when it has no config.yaml yet; the default
    when the file names none (a run directory written before sinks existed). Read once per process and
    run directory (sink_for remembers it), so it is not counted with the replicas' per-unit operations."""
    try:
        text = (Path(root) / "config.yaml").read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    import yaml

    try:
        found = yaml.safe_load(text)
    except yaml.YAMLError:
        return DEFAULT_FORMAT
    output = found.get("output") if isinstance(found, dict) else None
    fmt = output.get("format") if isinstance(output, dict) else None
    return fmt if fmt in SINKS else DEFAULT_FORMAT


def sink_for(run, fmt: str | None = None) -> ResultSink:
    """The sink of a run directory (a RunPaths or its root path). fmt given: that format's sink; else the
    run's own (see the module), remembered per directory once config.yaml names it. A run directory
    without config.yaml (a bare one in a test) is Parquet, and is asked again next time."""
    root = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)
    if fmt is not None:
        if fmt not in SINKS:
            from ..errors import ConfigError

            raise ConfigError(f"output.format={fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
        return SINKS[fmt](root)
    sink = _known.get(root)
    if sink is None:
        found = format_of(root)
        sink = SINKS[found or DEFAULT_FORMAT](root)
        if found is not None:
            _check_one_format(sink)
            _known[root] = sink
    return sink


def _check_one_format(sink: ResultSink) -> None:
    """Refuse a run directory whose results/ holds another format's units than its config.yaml names (a
    resume with another output.format): old and new units would be in two formats, each counted apart.
    One listing, once per process and run directory."""
    try:
        names = os.listdir(sink.results)
    except (FileNotFoundError, NotADirectoryError):
        return
    for fmt, cls in SINKS.items():
        if cls is not type(sink) and cls(sink.root).units_in(names):
            from ..errors import RunError

            raise RunError(f"run_dir {sink.root} was started with output.format={fmt} (results/ holds its "
                           f"part-*{cls.suffix} files), but its config.yaml now says output.format={sink.format}. "
                           f"Rerun with output.format={fmt} to resume, or choose a new run_dir= for a fresh run")


def sink_of_file(path: Path) -> ResultSink:
    """The sink that wrote a result file (by its name), for a run directory's results/<file>."""
    path = Path(path)
    for cls in SINKS.values():
        sink = cls(path.parent.parent)
        if sink.unit_of(path.name) is not None:  # part-<unit><suffix>: .batch.jsonl is not a JSONL unit's
            return sink
    return ParquetDirSink(path.parent.parent)
