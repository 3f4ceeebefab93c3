"""`orchestrator pipeline FILE [key=value ...]`: a pipeline's stages, in order, each in its own directory
DIR/<stage> (orchestrator.pipeline_config loads and checks the file before anything runs).

- A run stage is an `orchestrator run` of its config; one that reads another stage (`from: S`) reads S's
  committed result files (`data.input=DIR/S/results`, `data.duplicate_ids=keep`: S's rollouts share an id),
  once S is complete. Each run resumes on its own, checked like any run (fingerprint, duplicates, journal).
- A selection stage (filter, best, pairs) streams: while the stages before it run, each unit its source
  commits is selected at once, in the front-end (no GPU is held for it), and written as the same unit of its
  own results, `DIR/<stage>/results/part-<unit>.parquet`, atomically, so a unit is selected exactly once
  whatever is killed when; its counts (rows in, kept, dropped as failed or null) are in the file's footer.
  Its settings are kept in `DIR/<stage>/stage.json`: a rerun with others is refused.
- A stage that fails stops the pipeline once the selections have consumed what was committed before it; the
  message names the stage. `DIR/pipeline.json` holds the funnel: each stage's rows in and rows out.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from .config import compose
from .errors import ConfigError, OrchestratorError, RunError
from .pipeline_config import Pipeline, Stage
from .rundir import atomic_write_text
from .selection import Counts

COUNTS_KEY = b"orchestrator.selection"  # a selected unit's Counts, in its Parquet footer
POLL_S = 1.0  # how often the selections look for units committed upstream while a run goes on


def _parts(results: Path) -> dict[int, Path]:
    """The committed units of a results folder: {unit: its part-<unit>.parquet} (temporary files aside)."""
    found = {}
    for path in results.glob("part-*.parquet") if results.is_dir() else ():
        stem = path.name[len("part-"):-len(".parquet")]
        if stem.isdigit():
            found[int(stem)] = path
    return found


def _selected(results: Path) -> tuple[int, Counts]:
    """A selection's units written so far and their counts summed (from the files' footers)."""
    parts = _parts(results)
    total = Counts()
    for path in parts.values():
        found = pq.read_schema(path).metadata or {}
        total += Counts(**json.loads(found[COUNTS_KEY])) if COUNTS_KEY in found else Counts()
    return len(parts), total


class Selector:
    """One selection stage over its source's results: every committed unit selected once."""

    def __init__(self, stage: Stage, source_results: Path):
        self.stage, self.source = stage, source_results
        self.root = Path(stage.run_dir)
        self.results = self.root / "results"
        self._check_settings()

    def _check_settings(self) -> None:
        settings = {"kind": self.stage.kind, "from": self.stage.source, "spec": _spec_json(self.stage)}
        record = self.root / "stage.json"
        if record.exists():
            before = json.loads(record.read_text())
            if before != settings:
                raise ConfigError(f"stage {self.stage.name!r}: {self.root} was selected with other settings "
                                  f"({before['kind']}: {json.dumps(before['spec'])}, from {before['from']}), not "
                                  f"{self.stage.kind}: {json.dumps(settings['spec'])}; give the pipeline another "
                                  f"run_dir, or delete {self.root} to select again")
        else:
            self.results.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, json.dumps(settings, indent=1) + "\n")

    def step(self) -> int:
        """Select every unit committed upstream and not yet here; the number selected now."""
        done = _parts(self.results)
        new = [path for unit, path in sorted(_parts(self.source).items()) if unit not in done]
        for path in new:
            table, counts = self.stage.spec.apply(pq.read_table(path))
            meta = {**(table.schema.metadata or {}), COUNTS_KEY: json.dumps(asdict(counts)).encode()}
            final = self.results / path.name
            tmp = self.results / f".{path.name}.{os.getpid()}.tmp"
            pq.write_table(table.replace_schema_metadata(meta), tmp)
            os.replace(tmp, final)  # the same unit selected twice (a rerun after a kill) is the same file
        return len(new)

    def counts(self) -> Counts:
        return _selected(self.results)[1]


def _spec_json(stage: Stage) -> dict:
    """A selection's settings, as they decide its output (a filter's by its text)."""
    spec = stage.spec
    if spec.kind == "filter":
        return {"filter": spec.filter.text}
    return {"by": spec.by, **({"k": spec.k, "order": spec.order} if spec.kind == "best" else
                              {"min_margin": spec.min_margin})}


class Streamer:
    """Runs the selection stages in the background while a run stage goes on (one look every POLL_S)."""

    def __init__(self, selectors: list[Selector]):
        self.selectors = selectors
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def drain(self) -> None:
        """Select everything committed so far, stage after stage (a selection may read a selection)."""
        for selector in self.selectors:
            selector.step()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(POLL_S):
                self.drain()
        except BaseException as exc:  # noqa: BLE001 - raised again by stop(), in the front-end's thread
            self._error = exc

    def __enter__(self) -> "Streamer":
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._loop, name="pipeline-selections", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def _run_config(pipeline: Pipeline, stage: Stage):
    """A run stage's config; one reading another stage reads that stage's committed result files."""
    if stage.source is None:
        return stage.config
    source = pipeline.stage(stage.source)
    results = Path(source.run_dir) / "results"
    if source.kind == "run" and source.config.output.format != "parquet":
        raise ConfigError(f"stage {stage.name!r} reads stage {source.name!r}, whose results are "
                          f"output.format={source.config.output.format}; a stage reads Parquet results: drop "
                          f"output.format there")
    return compose([*stage.spec, *pipeline.overrides, f"data.input={results / 'part-*.parquet'}",
                    "data.duplicate_ids=keep", f"run_dir={stage.run_dir}"])


RECORD = "pipeline.json"  # DIR/pipeline.json: the file, its stages (kind, from, directory) and, at the end, the funnel


def is_pipeline_dir(path) -> bool:
    return (Path(path) / RECORD).is_file()


def _record(pipeline: Pipeline, funnel: dict | None = None) -> None:
    stages = [{"name": s.name, "kind": s.kind, "from": s.source, "run_dir": s.run_dir} for s in pipeline.stages]
    atomic_write_text(Path(pipeline.run_dir) / RECORD, json.dumps(
        {"file": pipeline.path, "stages": stages, **({"funnel": funnel} if funnel is not None else {})},
        indent=1) + "\n")


def stages_of(pipeline_dir) -> list[dict]:
    """The stages a pipeline directory records: name, kind, from, run_dir."""
    return json.loads((Path(pipeline_dir) / RECORD).read_text())["stages"]


def pipeline_status(pipeline_dir) -> dict:
    """Where each stage of a pipeline stands (`orchestrator status DIR --json`): a run stage's `status` (its
    rows, errors, jobs, ...; `started: false` before it plans), a selection's units selected and counts."""
    from .status import collect

    stages = []
    for stage in stages_of(pipeline_dir):
        root = Path(stage["run_dir"])
        if stage["kind"] == "run":
            started = (root / "plan.json").exists()
            stages.append({**stage, "started": started, **({"status": collect(root)} if started else {})})
        else:
            units, counts = _selected(root / "results")
            stages.append({**stage, "started": root.exists(), "units_selected": units, **asdict(counts)})
    return {"pipeline": str(pipeline_dir), "stages": stages}


def status_lines(pipeline_dir) -> str:
    """`orchestrator status DIR` of a pipeline: one line per stage, in order, with the funnel so far."""
    from .report import one_line

    lines = [f"pipeline {pipeline_dir}"]
    for stage in pipeline_status(pipeline_dir)["stages"]:
        head = f"  {stage['name']} ({stage['kind']}{', from ' + stage['from'] if stage['from'] else ''}): "
        if stage["kind"] == "run":
            found = stage.get("status")
            if found is None:
                lines.append(head + "not started")
                continue
            rows = found["rows"]
            lines.append(head + (one_line(found["summary"]) if found.get("summary") else
                                 f"{rows['committed']}/{rows['total']} rows committed, {rows['ok']} ok, "
                                 f"{rows['failed']} failed"))
        else:
            lines.append(head + f"{stage['units_selected']} unit(s) selected, {stage['kept']} kept of "
                         f"{stage['rows_in']} ({stage['dropped_failed']} failed upstream, "
                         f"{stage['dropped_null']} null)")
    return "\n".join(lines)


def render_pipeline(pipeline: Pipeline) -> list[Path]:
    """`orchestrator pipeline FILE --render`: every run stage's `orchestrator render`, in DIR/<stage>/render;
    nothing submitted."""
    from .render import render

    written = []
    for stage in pipeline.stages:
        if stage.kind == "run":
            written += render(_run_config(pipeline, stage))
    return written


def run_pipeline(pipeline: Pipeline, show_progress: bool = True) -> dict:
    """Run every stage (see the module doc); the funnel, also written to DIR/pipeline.json."""
    from .frontend import run

    root = Path(pipeline.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _record(pipeline)
    selectors: dict[str, Selector] = {}
    funnel: dict[str, dict] = {}
    for stage in pipeline.stages:
        if stage.kind != "run":
            selectors[stage.name] = Selector(stage, Path(pipeline.stage(stage.source).run_dir) / "results")
    streamer = Streamer(list(selectors.values()))
    for stage in pipeline.stages:
        if stage.kind != "run":
            continue
        streamer.drain()  # a stage reading a selection reads all of it
        cfg = _run_config(pipeline, stage)
        print(f"stage {stage.name}: {'run' if stage.source is None else 'reads ' + stage.source}", flush=True)
        try:
            with streamer:
                summary = run(cfg, show_progress=show_progress)
        except OrchestratorError as exc:
            streamer.drain()
            raise RunError(f"stage {stage.name!r} failed: {exc}\nthe stages before it are kept; the "
                           f"selections have consumed what it committed; rerun the pipeline to resume") from None
        funnel[stage.name] = {"kind": "run", "rows": summary.get("total"), "ok": summary.get("ok"),
                              "failed": summary.get("failed")}
    streamer.drain()
    for name, selector in selectors.items():
        funnel[name] = {"kind": selector.stage.kind, "from": selector.stage.source, **asdict(selector.counts())}
    _record(pipeline, funnel)
    for name, step in funnel.items():
        print(f"{name}: " + (f"{step['ok']}/{step['rows']} ok, {step['failed']} failed" if step["kind"] == "run" else
                             f"{step['kept']} kept of {step['rows_in']} ({step['dropped_failed']} failed upstream, "
                             f"{step['dropped_null']} null) -> {Path(pipeline.stage(name).run_dir) / 'results'}"))
    return funnel
