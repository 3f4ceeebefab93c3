"""A pipeline file (issue 22): stages in order, each a run (Hydra overrides, as users write them) or a
selection without an engine (`filter`, `best`, `pairs`: orchestrator.selection) reading the stage before
it with `from`. Loading checks everything that can be checked before submission: the file's shape, the
stages' names and order, every run stage's composed config, and that each stage reads only columns its
`from` stage produces.

    stages:
      - name: generate
        overrides: [model=nemotron4_340b_instruct, engine=vllm, sampling.rollouts=4]
      - name: keep
        from: generate
        filter: "output_tokens >= 8 and finish_reason == 'stop'"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, compose
from .engines.base import check_engine
from .errors import ConfigError
from .plan import Plan, result_schema
from .selection import KINDS, parse_selection

STAGE_KEYS = ("name", "from", "overrides", *KINDS)
STAGE_KINDS = ("overrides", *KINDS)  # a stage has exactly one of these
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_USAGE = ("each stage is {name: NAME, from: EARLIER_STAGE (optional for a run), and one of overrides: [KEY=VALUE, "
          "...] | filter: EXPRESSION | best: {by: COLUMN, k: 1, order: max} | pairs: {by: COLUMN, min_margin: 0.0}}")


@dataclass(frozen=True)
class Stage:
    """One stage: `kind` is run (its `overrides` and composed `config`) or a selection (its parsed `spec`);
    `source` is the stage it reads (`from`), `run_dir` its own directory, <pipeline dir>/<name>."""
    name: str
    kind: str  # run, filter, best, pairs
    spec: Any  # run: the stage's own overrides (a tuple); a selection: orchestrator.selection.Selection
    source: str | None
    run_dir: str
    config: Config | None = None

    @property
    def scores(self) -> tuple[str, ...]:
        """A scoring run's score columns: its model's attributes (none for a generation run)."""
        return _attributes(self.config) if self.config is not None else ()


@dataclass(frozen=True)
class Pipeline:
    path: str
    run_dir: str  # the pipeline's directory: stage S lives in run_dir/S
    stages: tuple[Stage, ...]
    overrides: tuple[str, ...] = ()  # the command line's, for every run stage after its own (run_dir aside)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def _attributes(cfg: Config) -> tuple[str, ...]:
    # model.attributes (a scoring model's outputs, by name) may be absent from this version's ModelConfig
    return tuple(getattr(cfg.model, "attributes", None) or ())


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def _split_run_dir(overrides: list[str], default: str) -> tuple[str, list[str]]:
    """The pipeline directory (the last `run_dir=DIR`) and the other overrides."""
    run_dir, rest = default, []
    for override in overrides:
        if _key(override) == "run_dir" and "=" in override:
            run_dir = override.split("=", 1)[1]
        else:
            rest.append(override)
    return run_dir, rest


def _read(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"pipeline file {path}: cannot be read ({exc.strerror}); give the path of a pipeline "
                          f"YAML file (examples/pipeline_local.yaml is one)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); quote a filter expression that holds ': ' "
                          f"or '#', e.g. filter: \"a >= 1\"") from None


def _check_shape(path: Path, doc: Any) -> list[dict]:
    if not isinstance(doc, dict) or "stages" not in doc:
        raise ConfigError(f"{path}: a pipeline file is a mapping with one key, stages: a list of stages; "
                          f"{_USAGE}")
    extra = [k for k in doc if k != "stages"]
    if extra:
        raise ConfigError(f"{path}: unknown top-level key {', '.join(map(repr, extra))}; a pipeline file has only "
                          f"`stages` (overrides for every stage go on the command line)")
    stages = doc["stages"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: stages must be a non-empty list; {_USAGE}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"{path}: stage {i + 1} is {stage!r}, not a mapping; {_USAGE}")
    return stages


def _check_stage(path: Path, i: int, raw: dict, earlier: list[str], later: list[str]) -> tuple[str, str, Any]:
    """A stage's name, kind and raw spec, with its keys and `from` checked."""
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{path}: stage {i + 1} needs a name (letters, digits, _ . -, starting with a letter or "
                          f"digit: it names the stage's directory), not {name!r}; e.g. name: generate")
    where = f"{path}, stage {name!r}"
    if name in earlier:
        raise ConfigError(f"{where}: the name is used by an earlier stage too; give every stage its own name")
    unknown = [k for k in raw if k not in STAGE_KEYS]
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), STAGE_KEYS, 1))
                 else repr(k) for k in unknown]
        raise ConfigError(f"{where}: unknown key {', '.join(hints)}; a stage's keys are {', '.join(STAGE_KEYS)}")
    kinds = [k for k in STAGE_KINDS if k in raw]
    if len(kinds) != 1:
        what = "none" if not kinds else " and ".join(kinds)
        raise ConfigError(f"{where}: has {what} of overrides, filter, best, pairs; give it exactly one (overrides "
                          f"for a run of an engine, or one selection)")
    kind = "run" if kinds[0] == "overrides" else kinds[0]
    source = raw.get("from")
    if source is not None:
        if not isinstance(source, str):
            raise ConfigError(f"{where}: from: {source!r} must name an earlier stage")
        if not earlier:
            raise ConfigError(f"{where}: the first stage has nothing before it to read (from: {source}); drop "
                              f"`from` and give it an input (data.input=... in its overrides)")
        if source not in earlier:
            if source == name or source in later:
                what = "itself" if source == name else f"stage {source!r}, which comes after it"
                raise ConfigError(f"{where}: from: {source} reads {what}; a stage reads only a stage before it "
                                  f"(so a pipeline cannot have a cycle): move it after {source!r}, or read one "
                                  f"of {', '.join(earlier)}")
            raise ConfigError(f"{where}: from: {source} names no stage; the stages before it are "
                              f"{', '.join(earlier)}")
    elif kind != "run":
        raise ConfigError(f"{where}: a {kind} stage reads another stage's results; add from: <one of "
                          f"{', '.join(earlier) or 'the stages before it'}>" +
                          ("" if earlier else ", and put a run stage (overrides: [...]) first"))
    return name, kind, raw[kinds[0]]


def _compose(where: str, stage_overrides: Any, global_overrides: list[str], run_dir: str, source: str | None
             ) -> tuple[tuple[str, ...], Config]:
    from hydra.errors import HydraException

    if not isinstance(stage_overrides, list) or not all(isinstance(o, str) for o in stage_overrides):
        raise ConfigError(f"{where}: overrides must be a list of KEY=VALUE texts, as on the command line, e.g. "
                          f"overrides: [engine=mock, sampling.rollouts=4], not {stage_overrides!r}")
    for override in stage_overrides:
        if _key(override) == "run_dir":
            raise ConfigError(f"{where}: {override!r}: a stage's run_dir is <pipeline dir>/<stage name>; drop it, and "
                              f"set the pipeline's directory on the command line (run_dir=DIR)")
        if source is not None and _key(override) == "data.input":
            raise ConfigError(f"{where}: {override!r}: this stage reads stage {source!r}'s results (from: "
                              f"{source}); drop data.input, or drop `from` to read a file")
    try:
        cfg = compose([*stage_overrides, *global_overrides, f"run_dir={run_dir}"])
        check_engine(cfg)  # e.g. a scoring model on a generation engine: refused before any stage runs
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except HydraException as exc:
        text = str(exc).split("\nConfig search path", 1)[0].strip()
        raise ConfigError(f"{where}: {text}") from None
    return tuple(stage_overrides), cfg


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and check a pipeline file. `overrides` apply to every run stage after its own; `run_dir=DIR`
    among them is the pipeline's directory (default runs/<the file's stem>), stage S's is DIR/S."""
    path = Path(path)
    run_dir, global_overrides = _split_run_dir(list(overrides or []), f"runs/{path.stem}")
    raws = _check_shape(path, _read(path))
    names = [raw.get("name") for raw in raws]
    checked: list[tuple[str, str, Any]] = []
    for i, raw in enumerate(raws):  # every stage's shape first: those messages come before any composing
        name, kind, spec = _check_stage(path, i, raw, [c[0] for c in checked], names[i + 1:])
        where = f"{path}, stage {name!r}"
        checked.append((name, kind, spec if kind == "run" else parse_selection(kind, spec, where)))
    stages: list[Stage] = []
    for raw, (name, kind, spec) in zip(raws, checked):
        stage_dir = str(Path(run_dir) / name)
        if kind == "run":
            own, cfg = _compose(f"{path}, stage {name!r}", spec, global_overrides, stage_dir, raw.get("from"))
            stages.append(Stage(name, kind, own, raw.get("from"), stage_dir, cfg))
        else:
            stages.append(Stage(name, kind, spec, raw["from"], stage_dir))
    pipeline = Pipeline(str(path), run_dir, tuple(stages), tuple(global_overrides))
    stage_columns(pipeline)
    check_allocation_shares(pipeline)
    return pipeline


def allocation_stages(pipeline: Pipeline) -> list[Stage]:
    """The run stages that run inside the user's own Slurm job (cluster=allocation), in stage order."""
    return [s for s in pipeline.stages if s.kind == "run" and s.config.cluster.name == "allocation"]


def check_allocation_shares(pipeline: Pipeline) -> None:
    """Two or more run stages inside one allocation run at the same time, so each needs its own nodes: every
    one of them says how many (cluster.nodes), and the pipeline gives each its own (cluster.nodelist, set when
    it runs: orchestrator.pipeline.split_allocation). One such stage uses the allocation as a run does."""
    stages = allocation_stages(pipeline)
    if len(stages) < 2:
        return
    names = ", ".join(s.name for s in stages)
    chosen = [s.name for s in stages if s.config.cluster.nodelist]
    if chosen:
        raise ConfigError(f"{pipeline.path}: stage(s) {', '.join(chosen)} set cluster.nodelist; in a pipeline whose "
                          f"run stages {names} share one allocation, the pipeline gives each stage its nodes from "
                          f"its cluster.nodes: drop cluster.nodelist and say cluster.nodes=N")
    missing = [s.name for s in stages if s.config.cluster.nodes is None]
    if missing:
        raise ConfigError(f"{pipeline.path}: run stages {names} run at the same time inside one allocation "
                          f"(cluster=allocation), and {', '.join(missing)} "
                          f"{'says' if len(missing) == 1 else 'say'} no cluster.nodes: they would compete for the "
                          f"same nodes. Give each of {names} its share (cluster.nodes=N in its overrides; together "
                          f"at most the job's nodes)")


def run_columns(cfg: Config) -> list[str]:
    """The columns a run with this config writes (orchestrator.plan.result_schema), from the config alone."""
    from .scoring import columns_for as scoring_columns
    from .structured import columns_for

    data = cfg.data
    plan = Plan(files=[], units=[], prompt_column=data.prompt_column, id_column=data.id_column, id_type="string",
                unit_rows=data.unit_rows, messages_column=data.messages_column, turns_column=data.turns_column,
                rollouts=cfg.sampling.rollouts, schema_column=data.schema_column or None)
    # a scoring run's score columns replace its own response (the input's may be kept), as the client writes them;
    # a judge's score column (output.score_column) is among structured.columns_for's
    names = result_schema(plan, logprobs=cfg.sampling.logprobs is not None,
                          structured=scoring_columns(cfg) or columns_for(cfg, plan)).names
    kept = [c for c in dict.fromkeys([*data.keep_columns, *(c for _, c in data.sampling_columns.items())])
            if c not in names]
    at = 2 if "rollout" in names else 1  # result_schema: id, rollout, the kept columns, response, ...
    return names[:at] + kept + names[at:]


def _run_reads(cfg: Config) -> list[str]:
    """The upstream columns a generation run reading another stage's results takes (as build_plan would
    check them on an input file)."""
    from .templates import template_names

    data = cfg.data
    if data.messages_column or data.turns_column:
        reads = [data.messages_column, data.turns_column, data.attributes_column]
    elif data.prompt_template is not None:
        reads = list(template_names(data.prompt_template))
    else:
        reads = [data.prompt_column]
    reads += [data.system_column, data.schema_column, *data.keep_columns,
              *(c for _, c in data.sampling_columns.items()), data.response_column if _attributes(cfg) else None]
    return list(dict.fromkeys(c for c in reads if c))


def stage_columns(pipeline: Pipeline) -> dict[str, list[str]]:
    """Each stage's output columns, in order: a run's result columns (with `rollout` when sampling.rollouts > 1,
    and its data.keep_columns; a scoring run, whose model has `attributes`, one per attribute instead of its own
    `response`); filter and best keep their input's; pairs writes its six.
    A stage reading a column its `from` stage does not produce is refused here, before anything runs."""
    produced: dict[str, list[str]] = {}
    for stage in pipeline.stages:
        where = f"{pipeline.path}, stage {stage.name!r}"
        upstream = produced.get(stage.source) if stage.source else None
        if stage.kind != "run":
            stage.spec.check_columns(upstream, where=f"{where} (from: {stage.source})")
            produced[stage.name] = stage.spec.columns(upstream)
            continue
        if upstream is not None:
            missing = [c for c in _run_reads(stage.config) if c not in upstream]
            if missing:
                raise ConfigError(f"{where} (from: {stage.source}): reads {', '.join(map(repr, missing))}, which "
                                  f"stage {stage.source!r} does not produce; its columns are {', '.join(upstream)}; "
                                  f"read those (data.prompt_template, data.prompt_column, data.keep_columns), or "
                                  f"keep the column upstream (data.keep_columns there)")
        produced[stage.name] = run_columns(stage.config)
    return produced

