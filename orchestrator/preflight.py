"""Everything checked before a job is submitted (layout, engine, cluster, input, run directory), the resume
fingerprint that a resumed run_dir must match, and the running engine's identity check."""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path

from .clusters.base import cluster_for
from .config import Config, config_yaml
from .engines.base import adapter_for, check_engine
from .errors import ConfigError, EngineError, InputError, RunError
from .follow import fingerprint as follow_fingerprint
from .follow import follow_plan
from .inputs import check_run_dir_outside_input, unique_file_entries
from .layout import build_layout
from .plan import Plan, apply_duplicate_policy, build_plan
from .row_settings import check_row_engine
from .rundir import RunPaths, atomic_write_text, publish_once
from .structured import fingerprint as structured_fingerprint


def check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunError(f"run_dir={str(root)!r} is a file, not a directory; choose another run_dir= (or move that "
                       f"file away)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"run_dir={str(root)!r} is not writable ({exc.strerror}); choose another run_dir=") from None


def prepare(cfg: Config, stop=None) -> tuple[Plan, RunPaths]:
    """Everything checked before a job is submitted: layout, engine, cluster, input, run directory.
    Writes plan and config. With data.follow, waits for the run followed to commit (stop: a threading.Event that
    ends the wait)."""
    build_layout(cfg)
    check_launch(cfg)
    check_run_dir_outside_input(cfg.input_path, cfg.run_dir)
    if cfg.data.follow is not None:
        plan = follow_plan(cfg, stop)
    else:
        plan = build_plan(cfg.data, cfg.input_path, cfg.sampling.rollouts, score=bool(cfg.model.attributes))
    check_row_engine(plan, cfg.engine.name, adapter_for(cfg).protocol_for(cfg))  # an OpenAI batch file's bodies
    paths = RunPaths(Path(cfg.run_dir).expanduser().resolve())
    check_writable(paths.root)
    current = fingerprint(cfg, plan)
    stored_print = paths.root / "fingerprint.json"
    if paths.plan.exists() and stored_print.exists():
        _check_same_settings(paths, stored_print, current)
        plan = Plan.from_json(paths.plan.read_text())
        resumed = True
    else:
        _refuse_replanning(paths, stored_print)
        plan = apply_duplicate_policy(plan, cfg.data, spill_dir=paths.root / "work")  # big inputs spill there
        resumed = False
    paths.make()
    if not resumed:  # the plan is fixed at the first start; of two first starts at once, one publishes
        if not publish_once(stored_print, json.dumps(current, indent=1, sort_keys=True)):
            _check_same_settings(paths, stored_print, current)
        atomic_write_text(paths.plan, plan.to_json())
    atomic_write_text(paths.root / "config.yaml", config_yaml(cfg))
    return plan, paths


def _refuse_replanning(paths: RunPaths, stored_print: Path) -> None:
    """A run_dir that holds a plan, results or a ledger but no fingerprint.json is never planned again: a new
    plan (another data.unit_rows, other input) over the committed files would trust them for other rows."""
    if stored_print.exists():
        return
    ledger = paths.root / "work" / "ledger"
    found = [str(p.relative_to(paths.root)) + ("/" if p.is_dir() else "")
             for p in (paths.plan, paths.results, ledger)
             if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if found:
        raise InputError(f"run_dir {paths.root} holds {', '.join(found)} but no fingerprint.json (the settings its "
                         f"committed rows were made with), so it cannot be resumed safely nor planned again. Restore "
                         f"{stored_print} from a backup of the run_dir to resume, or choose a new run_dir= for a "
                         f"fresh run")


def _check_same_settings(paths: RunPaths, stored_print: Path, current: dict) -> None:
    stored = json.loads(stored_print.read_text())
    if isinstance(stored.get("sampling"), dict):  # a run_dir started before sampling.rollouts existed: one answer a row
        stored["sampling"].setdefault("rollouts", 1)
        stored["sampling"].setdefault("logprobs", None)  # ... or sampling.logprobs: none
    stored.setdefault("output.format", "parquet")  # a run_dir started before output.format existed
    if isinstance(stored.get("input_files"), list):  # a run_dir planned with a symlinked file twice
        stored["input_files"] = unique_file_entries(stored["input_files"])
    changed = _differences(stored, current)
    if changed:
        raise InputError(f"run_dir {paths.root} was started with other settings, so old and new results would "
                         f"disagree: {'; '.join(changed[:8])}. Rerun with the original settings to resume, or "
                         f"choose a new run_dir= for a fresh run")


def check_launch(cfg: Config) -> None:
    """The engine's and the cluster's own checks, before any GPU is asked for."""
    engine = check_engine(cfg)
    found = cluster_for(cfg).problems(cfg, engine)
    if found:
        raise ConfigError("\n".join(found))


def fingerprint(cfg: Config, plan: Plan) -> dict:
    """What decides the answers: model, prompt format, sampling, engine, and the exact input files."""
    return {
        "model": cfg.model.name,
        "model.path": cfg.model.path,
        "model.max_seq_len": cfg.model.architecture.max_seq_len,
        # reasoning_tags unset is left out, as in a run_dir started before it existed
        "model.prompt": {k: v for k, v in asdict(cfg.model.prompt).items() if v is not None or k != "reasoning_tags"},
        "end_strings": cfg.end_strings,
        # rollouts decides the answers and the units' layout; whether they go in one request does neither,
        # except on NeMo, where it sends them as copies under one seed (other answers): see _nemo_copies
        "sampling": {k: v for k, v in asdict(cfg.sampling).items() if k != "rollouts_in_one_request"},
        **({"sampling.rollouts_in_one_request": True} if _nemo_copies(cfg) else {}),
        "engine": cfg.engine.name,
        "engine.answers": adapter_for(cfg).answer_settings(cfg),
        **({"engine.dialect": cfg.engine.dialect} if cfg.engine.dialect else {}),  # unset: as before it existed
        "engine.settings": {k: getattr(cfg.engine, k) for k in ("checkpoint", "url", "protocol", "api", "precision",
                                                               "command", "script", "extra_args", "options",
                                                               "served_model_name", "skip_special_tokens",
                                                               "extra_body")},
        "data": {**{k: getattr(cfg.data, k) for k in ("prompt_column", "id_column", "unit_rows", "duplicate_ids",
                                                      "truncate_prompts", "bytes_per_token")},
                 # conversations and prompt templates; unset is None, as in a run_dir started before they existed
                 **{k: getattr(cfg.data, k) or None for k in ("messages_column", "turns_column",
                                                             "attributes_column", "keep_columns",
                                                             "prompt_template", "system_column",
                                                             "schema_column")},
                 # per-row sampling and the input's format; unset (Parquet) is None, as before they existed
                 "sampling_columns": dict(plan.sampling_columns) or None,
                 "format": plan.input_format if plan.input_format != "parquet" else None},
        "input_files": [[f.path, f.rows, f.size, f.mtime_ns] for f in plan.files],
        **follow_fingerprint(cfg),  # data.follow: the run whose results are the input (absent when unset)
        "output.format": cfg.output.format,  # the result files' format (orchestrator.sinks)
        # structured answers (the schema itself is sampling.json_schema); None without a schema, as before
        "structured": structured_fingerprint(cfg),
        # a scoring run: the outputs it names and the answers it scores; absent for a generation run, as before
        **({"scoring": {"attributes": list(cfg.model.attributes), "response_column": plan.response_column}}
           if cfg.model.attributes else {}),
    }


def _nemo_copies(cfg: Config) -> bool:
    """protocols.nemo.nemo_copies, on an engine that may speak NeMo's protocol."""
    from .protocols.nemo import nemo_copies

    return adapter_for(cfg).protocol_for(cfg) in ("nemo", None) and nemo_copies(cfg)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and prefix.startswith("engine.settings"):  # recorded by a later version: not a change
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "input_files":
                found.append(_input_changes(a or [], b or []))
            else:
                found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


def _input_changes(old: list, new: list) -> str:
    """Which input files changed since the first start, and how: [path, rows, size, mtime_ns] each."""
    before, after = {f[0]: f for f in old}, {f[0]: f for f in new}
    said = [f"{p} is gone" for p in before if p not in after] + [f"{p} is new" for p in after if p not in before]
    for path in before.keys() & after.keys():
        (_, rows0, size0, _), (_, rows1, size1, _) = before[path], after[path]
        if before[path] != after[path]:
            said.append(f"{path} changed (" + (f"{rows0} -> {rows1} rows" if rows0 != rows1 else
                                               f"{size0} -> {size1} bytes" if size0 != size1 else
                                               "modified since") + ")")
    shown = ", ".join(sorted(said)[:4]) + (f" and {len(said) - 4} more" if len(said) > 4 else "")
    return f"the input files changed since the first start: {shown}"


def check_engine_identity(paths: RunPaths, info) -> None:
    """What the running engine says about itself (its served model, protocol, context) is part of the
    run's settings: behind an unchanged engine.url there may now be another model."""
    identity = {"served model": info.model_name, "protocol": info.protocol, "api": info.api,
                "context": info.max_model_len}
    path = paths.root / "engine.json"
    if publish_once(path, json.dumps(identity, indent=1, sort_keys=True)):
        return
    changed = _differences(json.loads(path.read_text()), identity)
    if changed:
        raise EngineError(f"the engine at {info.url} is not the one that answered this run_dir's committed rows: "
                          f"{'; '.join(changed)}. Resume against the original engine, or choose a new run_dir= for a "
                          f"fresh run")
