"""`orchestrator pipeline FILE [key=value ...]`: a pipeline's stages, in order, each in its own directory
DIR/<stage> (orchestrator.pipeline_config loads and checks the file before anything runs).

- A run stage is an `orchestrator run` of its config, its front-end in a thread of the pipeline's (StageRun).
  One that reads a run stage (`from: S`) follows it (`data.follow=DIR/S`, orchestrator.follow): it starts with
  S, submits its jobs once S has committed its first unit (data.follow_after: a share), and each of its units
  is one of S's, claimed once S has committed it, so it scores or judges while S generates. One that reads a
  selection reads the selection's files once it is complete. Each run resumes on its own, checked like any
  run (fingerprint, duplicates, journal); `data.duplicate_ids=keep`: S's rollouts share an id.
- A selection stage (filter, best, pairs) streams: while the stages before it run, each unit its source
  commits is selected at once, in the front-end (no GPU is held for it), and written as the same unit of its
  own results, `DIR/<stage>/results/part-<unit>.parquet`, atomically, so a unit is selected exactly once
  whatever is killed when; its counts (rows in, kept, dropped as failed or null) are in the file's footer.
  Its settings are kept in `DIR/<stage>/stage.json`: a rerun with others is refused.
- Inside one Slurm allocation (cluster=allocation), run stages run at the same time on nodes of their own:
  each stage's `cluster.nodes`, a slice of the allocation's nodes in stage order (split_allocation, which
  sets each stage's cluster.nodelist). A single such stage uses the allocation as a run does.
- A stage that fails ends the stages reading it once they have consumed what it committed (a follower's
  replicas end when S's front-end has ended and no unit of S is left to come); the message names the stage
  that failed first and what became of the others. `DIR/pipeline.json` holds the funnel: each stage's rows in
  and rows out.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow.parquet as pq

from .config import compose
from .errors import ConfigError, OrchestratorError, RunError
from .pipeline_config import Pipeline, Stage, allocation_stages
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


def split_allocation(pipeline: Pipeline, job: str | None, nodes: list[str]) -> dict[str, list[str]]:
    """Each run stage's own nodes of the allocation (job: its id, nodes: its hostnames, in Slurm's order) when
    two or more run stages share it: consecutive slices of nodes, in stage order, of each stage's cluster.nodes
    (load_pipeline checked that each says it). {} when at most one run stage runs in an allocation: that one
    uses it as a run does. Refused, naming the stages and the counts, when they do not fit."""
    stages = allocation_stages(pipeline)
    if len(stages) < 2:
        return {}
    asked = ", ".join(f"{s.name} (cluster.nodes={s.config.cluster.nodes})" for s in stages)
    if not job:
        raise ConfigError(f"{pipeline.path}: run stages {asked} run with cluster=allocation, which runs inside a "
                          f"Slurm job (SLURM_JOB_ID is not set): put `orchestrator pipeline` in a script you submit "
                          f"with sbatch -N {sum(s.config.cluster.nodes for s in stages)}, or use cluster=slurm")
    total = sum(s.config.cluster.nodes for s in stages)
    if total > len(nodes):
        raise ConfigError(f"{pipeline.path}: run stages {asked} run at the same time inside job {job} and need "
                          f"{total} node(s) together; the job holds {len(nodes)} ({', '.join(nodes) or 'none'}). "
                          f"Lower their cluster.nodes to sum to at most {len(nodes)}, or submit with sbatch -N {total}")
    slices, at = {}, 0
    for stage in stages:
        slices[stage.name] = nodes[at:at + stage.config.cluster.nodes]
        at += stage.config.cluster.nodes
    return slices


def _with_nodes(cfg, stage: Stage, nodes: list[str] | None):
    """cfg on exactly these nodes of the allocation (cluster.nodelist), its steps named after the stage (two
    stages' replica steps in one job must not share a name: a stage stops its own steps by name), or as it is."""
    if not nodes:
        return cfg
    return replace(cfg, cluster=replace(cfg.cluster, nodelist=list(nodes),
                                        job_name=f"{cfg.cluster.job_name}-{stage.name}"))


def _run_config(pipeline: Pipeline, stage: Stage, nodes: list[str] | None = None):
    """A run stage's config (on these nodes of the allocation, when given). One reading a run stage follows it
    (data.follow: unit by unit, as that one commits); one reading a selection reads the selection's files once
    it is complete."""
    if stage.source is None:
        return _with_nodes(stage.config, stage, nodes)
    source = pipeline.stage(stage.source)
    if source.kind == "run" and source.config.output.format != "parquet":
        raise ConfigError(f"stage {stage.name!r} reads stage {source.name!r}, whose results are "
                          f"output.format={source.config.output.format}; a stage reads Parquet results: drop "
                          f"output.format there")
    reads = [f"data.follow={source.run_dir}", "data.input=null"] if source.kind == "run" else \
        [f"data.input={Path(source.run_dir) / 'results' / 'part-*.parquet'}"]
    return _with_nodes(compose([*stage.spec, *pipeline.overrides, *reads, "data.duplicate_ids=keep",
                                f"run_dir={stage.run_dir}"]), stage, nodes)


class StageRun(threading.Thread):
    """One run stage's front-end (frontend.run), in a thread of the pipeline's front-end: it owns its jobs and
    cancels them when `stop` is set (Ctrl-C or a stop signal reaching the pipeline)."""

    def __init__(self, stage: Stage, cfg, show_progress: bool):
        super().__init__(name=f"stage-{stage.name}", daemon=True)
        self.stage, self.cfg, self.show_progress = stage, cfg, show_progress
        self.stop = threading.Event()
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from .frontend import run

        try:
            self.summary = run(self.cfg, show_progress=self.show_progress, stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 - the pipeline's front-end reports it, naming the stage
            self.error = exc


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


def _failed(runs: dict[str, StageRun], pipeline: Pipeline) -> RunError:
    """The pipeline's failure: the first stage that failed and why, and what became of the stages after it."""
    failed = [(name, r) for name, r in runs.items() if r.error is not None]
    first, run = failed[0]
    lines = [f"stage {first!r} failed: {run.error}"]
    for name, other in failed[1:]:
        source = pipeline.stage(name).source
        why = str(other.error).splitlines()[0]
        lines.append(f"stage {name!r} (reading {source!r}) stopped too, once it had consumed what was committed: "
                     f"{why}")
    never = [s.name for s in pipeline.stages if s.kind == "run" and s.name not in runs]
    if never:
        lines.append(f"not started: {', '.join(never)}")
    lines.append("the stages' committed results are kept; rerun the pipeline to resume every stage")
    return RunError("\n".join(lines))


def run_pipeline(pipeline: Pipeline, show_progress: bool = True) -> dict:
    """Run every stage (see the module doc); the funnel, also written to DIR/pipeline.json.

    Each run stage's front-end runs in a thread of its own (StageRun); this one starts them (a stage reading a
    run at once: it follows it; a stage reading a selection once the selection is complete), selects the units
    committed meanwhile every POLL_S, and on Ctrl-C or a stop signal stops every stage (each cancels its jobs)."""
    from .clusters.allocation import allocation_nodes
    from .clusters.environment import job_environment
    from .frontend import FrontEndStopped, Interrupted, _raise_on_stop_signals

    shared = len(allocation_stages(pipeline)) > 1  # run stages at once in one allocation: each on its own nodes
    slices = split_allocation(pipeline, job_environment().job_id,
                              allocation_nodes() if shared and job_environment().job_id else [])
    for name, nodes in slices.items():
        print(f"stage {name}: on node(s) {', '.join(nodes)} of job {job_environment().job_id}", flush=True)
    root = Path(pipeline.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _record(pipeline)
    selectors: dict[str, Selector] = {}
    for stage in pipeline.stages:
        if stage.kind != "run":
            selectors[stage.name] = Selector(stage, Path(pipeline.stage(stage.source).run_dir) / "results")
    runs: dict[str, StageRun] = {}
    final: set[str] = set()  # stages whose output is complete: a run that ended well, a selection of a final one
    ended: set[str] = set()  # run stages whose front-end ended, well or not

    def start_ready() -> None:
        for stage in pipeline.stages:
            if stage.kind != "run" or stage.name in runs:
                continue
            source = pipeline.stage(stage.source) if stage.source else None
            if source is not None and (source.name not in runs if source.kind == "run" else source.name not in final):
                continue
            cfg = _run_config(pipeline, stage, slices.get(stage.name))
            print(f"stage {stage.name}: " + ("starts" if source is None else f"follows {source.name}, unit by unit"
                                             if source.kind == "run" else f"reads {source.name}"), flush=True)
            runs[stage.name] = StageRun(stage, cfg, show_progress and not runs)
            runs[stage.name].start()

    def look() -> None:
        for name, run in runs.items():
            if name not in ended and not run.is_alive():
                ended.add(name)
                if run.error is None:
                    final.add(name)
                else:  # a stage following it and still waiting for its first unit: there is none to come
                    for other in runs.values():
                        if other.stage.source == name and not (Path(other.stage.run_dir) / "plan.json").exists():
                            other.stop.set()
        for name, selector in selectors.items():  # in order: a selection may read a selection
            complete = selector.stage.source in final
            selector.step()
            if complete:
                final.add(name)

    stop_signals = _raise_on_stop_signals()
    try:
        while True:
            look()
            start_ready()  # a stage reading a selection starts once the selection is complete
            if all(name in ended for name in runs):
                break
            time.sleep(POLL_S)
    except (KeyboardInterrupt, FrontEndStopped) as exc:
        why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"interrupted by {why}: stopping the pipeline's stages", flush=True)
        for run in runs.values():
            run.stop.set()
        for run in runs.values():
            run.join()
        for selector in selectors.values():
            selector.step()
        raise Interrupted(f"interrupted by {why}: every stage's jobs are cancelled and what they committed is kept; "
                          f"rerun the pipeline to resume") from None
    finally:
        for signum, handler in stop_signals.items():
            signal.signal(signum, handler)
    if any(run.error is not None for run in runs.values()):
        errors = [run.error for run in runs.values() if run.error is not None]
        if not all(isinstance(e, OrchestratorError) for e in errors):
            raise next(e for e in errors if not isinstance(e, OrchestratorError))
        raise _failed(runs, pipeline) from None
    funnel: dict[str, dict] = {}
    for stage in pipeline.stages:
        if stage.kind == "run":
            summary = runs[stage.name].summary or {}
            funnel[stage.name] = {"kind": "run", "rows": summary.get("total"), "ok": summary.get("ok"),
                                  "failed": summary.get("failed")}
        else:
            selector = selectors[stage.name]
            funnel[stage.name] = {"kind": stage.kind, "from": stage.source, **asdict(selector.counts())}
    _record(pipeline, funnel)
    for name, step in funnel.items():
        print(f"{name}: " + (f"{step['ok']}/{step['rows']} ok, {step['failed']} failed" if step["kind"] == "run" else
                             f"{step['kept']} kept of {step['rows_in']} ({step['dropped_failed']} failed upstream, "
                             f"{step['dropped_null']} null) -> {Path(pipeline.stage(name).run_dir) / 'results'}"))
    return funnel
