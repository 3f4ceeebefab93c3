"""The input files: finding them (data.input) and checking each one's schema from its footer against the data
config, before anything is submitted."""
from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .columns import NOT_SCORED, RESULT_COLUMNS
from .config import DataConfig
from .errors import ConfigError, InputError


@dataclass
class InputFile:
    path: str
    name: str  # stable name used in positional ids: path relative to the input root
    rows: int
    size: int
    mtime_ns: int


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def discover_inputs(spec: str, fmt: str = "auto") -> tuple[list[Path], Path]:
    """Files named by a Parquet or JSONL file, a directory of them, or a glob; and the root for names.
    fmt: data.format (a directory is searched for its files: *.parquet, *.jsonl, or either in auto)."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"data.input={spec!r}: the glob matches no file; check the pattern")
        root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
    elif path.is_dir():
        suffixes = (".parquet",) if fmt == "parquet" else JSONL_SUFFIXES if fmt in ("jsonl", "openai_batch") \
            else (".parquet",) + JSONL_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
        if not files:
            raise InputError(f"data.input={spec!r}: the directory holds no {' or '.join('*' + s for s in suffixes)} "
                             f"file")
        root = path.resolve()
    elif path.is_file():
        files, root = [path], path.resolve().parent
    else:
        raise InputError(f"data.input={spec!r} does not exist; give a Parquet or JSONL file, a directory or a glob")
    # one entry a file: a symlink to a file (or directory) already found names that file again, and its rows
    # would be planned twice under one positional id. The first name in sorted order is kept.
    return list(dict.fromkeys(f.resolve() for f in files)), root


def input_format(spec: str, paths: list[Path], fmt: str = "auto") -> str:
    """The input's format: data.format, or in auto each file's by its suffix (a JSONL file whose first line
    has custom_id and body is an OpenAI Batch API file). Parquet and JSONL files may not mix in one input."""
    from .jsonl_input import looks_like_batch

    if fmt != "auto":
        return fmt
    kinds = {p: "jsonl" if p.suffix in JSONL_SUFFIXES else "parquet" for p in paths}
    if len(set(kinds.values())) > 1:
        example = {k: next(p for p, v in kinds.items() if v == k).name for k in ("parquet", "jsonl")}
        raise InputError(f"data.input={spec!r} mixes Parquet ({example['parquet']}) and JSONL ({example['jsonl']}) "
                         f"files; one run reads one format: point data.input at one kind (e.g. a glob "
                         f"'*.jsonl'), or convert the others")
    found = next(iter(kinds.values()), "parquet")
    if found == "jsonl" and paths and looks_like_batch(paths[0]):
        return "openai_batch"
    return found


def unique_file_entries(entries: list) -> list:
    """A stored fingerprint's input_files ([path, rows, size, mtime_ns] each) once each, in order: a run_dir
    planned before discover_inputs dropped repeated files lists a symlinked file twice, and still resumes."""
    return [list(entry) for entry in dict.fromkeys(tuple(entry) for entry in entries)]


# what a run_dir holds that a pattern over the input could match: its results, spills and records
_RUN_DIR_FILES = ("results/part-00000.parquet", "results/part-00000.jsonl", "work/spill.parquet", "plan.json",
                  "output.jsonl", "errors.jsonl")


def check_run_dir_outside_input(spec: str, run_dir: str) -> None:
    """Refuse a run_dir that the input's discovery would reach, before anything is planned or submitted: its
    results would be read back as input, and every rerun would fail on them ("results/part-...: no prompt
    column"). A run_dir beside the input files, out of the pattern's reach, is fine."""
    target = Path(run_dir).expanduser()
    runs = {Path(os.path.abspath(target)), target.resolve()}
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        reached = any(_glob_matches(pattern, run / name) for pattern in _patterns(path) for run in runs
                      for name in _RUN_DIR_FILES)
        reached = reached or any(run in Path(os.path.abspath(p)).parents or run in Path(p).resolve().parents
                                 for p in glob.glob(str(path), recursive=True) for run in runs)
    elif path.is_dir():
        top = path.resolve()
        reached = any(run == top or top in run.parents for run in runs)
    else:
        reached = False
    if reached:
        raise ConfigError(f"run_dir={str(run_dir)!r} is inside data.input={spec!r}, so its results would be read "
                          f"as input on every rerun; choose a run_dir outside the input directory (or a data.input "
                          f"pattern that does not reach it)")


def _patterns(pattern: Path) -> list[Path]:
    """An absolute glob as written, and with its literal leading directories' symlinks resolved."""
    absolute = Path(os.path.abspath(pattern))
    parts = absolute.parts
    literal = next(i for i, part in enumerate(parts + ("*",)) if any(ch in part for ch in "*?["))
    return [absolute, Path(*Path(*parts[:literal]).resolve().parts, *parts[literal:])]


def _glob_matches(pattern: Path, path: Path) -> bool:
    """Whether glob.glob(pattern, recursive=True) would list path if it existed (as glob does: ** spans any
    number of directories, and a wildcard matches no hidden name)."""
    def match(pats: tuple[str, ...], names: tuple[str, ...]) -> bool:
        if not pats:
            return not names
        if pats[0] == "**":
            return any(match(pats[1:], names[i:]) for i in range(len(names) + 1)
                       if not any(name.startswith(".") for name in names[:i]))
        if not names or (names[0].startswith(".") and not pats[0].startswith(".")):
            return False
        return fnmatch.fnmatchcase(names[0], pats[0]) and match(pats[1:], names[1:])

    return match(pattern.parts, path.parts)


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({exc}); convert it with "
                         f"pandas.read_*(...).to_parquet(...) or drop it from data.input") from None


def _id_type(kind: pa.DataType, path: Path, data: DataConfig) -> str:
    """The id column's type in results: text or integers. Dictionary-encoded ids (pandas categoricals) are
    their values; any other type is refused here, before anything is submitted."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_null(kind):  # no value at all (an empty file): its nulls, if any, are refused as null ids
        return "string"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        return str(kind)
    raise InputError(f"{path}: id column {data.id_column!r} has type {kind}; ids must be text or integers. Cast "
                     f"it (e.g. df[{data.id_column!r}].astype(str)), or point data.id_column at another column "
                     f"(a name the files lack gives positional ids <file>:<row>)")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _list_value(kind: pa.DataType) -> pa.DataType | None:
    return kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None


def _column(path: Path, schema: pa.Schema, key: str, name: str) -> pa.DataType:
    if name not in schema.names:
        raise InputError(f"{path}: no column {name!r} ({key}); the columns are {schema.names}; "
                         f"set {key}=<one of them>")
    return schema.field(name).type


def _check_conversation_columns(path: Path, schema: pa.Schema, data: DataConfig) -> None:
    """The conversation columns' types, so that no row fails for a reason every row shares."""
    if data.messages_column:
        kind = _column(path, schema, "data.messages_column", data.messages_column)
        item = _list_value(kind)
        fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)} \
            if item is not None and pa.types.is_struct(item) else {}
        if not ("role" in fields and "content" in fields and _is_text(fields["role"]) and _is_text(fields["content"])):
            raise InputError(
                f"{path}: column {data.messages_column!r} (data.messages_column) has type {kind}; it must be a list "
                f"of {{role, content}} structs with text values, e.g. [{{'role': 'user', 'content': 'Hi'}}] per row. "
                f"Store the messages as lists of dicts (JSON text: df[col] = df[col].map(json.loads)), or point "
                f"data.messages_column at another column")
    if data.turns_column:
        kind = _column(path, schema, "data.turns_column", data.turns_column)
        item = _list_value(kind)
        if item is None or not _is_text(item):
            raise InputError(f"{path}: column {data.turns_column!r} (data.turns_column) has type {kind}; it must be "
                             f"a list of user turns (text), e.g. ['first question', 'follow-up'] per row. Store "
                             f"lists of strings, or point data.turns_column at another column")
    if data.attributes_column:
        kind = _column(path, schema, "data.attributes_column", data.attributes_column)
        if not _is_text(kind):
            raise InputError(f"{path}: column {data.attributes_column!r} (data.attributes_column) has type {kind}; "
                             f"it must hold one SteerLM attribute line (text) per row, e.g. "
                             f"'quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4'")


def _kept_types(path: Path, schema: pa.Schema, data: DataConfig, rollouts: int = 1,
                score: bool = False) -> dict[str, pa.DataType]:
    """data.keep_columns in one file: they must exist, and not clash with a result column (a scoring run writes no
    response or generation columns of its own, columns.NOT_SCORED: it may keep its input's)."""
    out = {}
    reserved = tuple(c for c in RESULT_COLUMNS if not (score and c in NOT_SCORED)) + \
        (("rollout",) if rollouts > 1 else ())
    for name in dict.fromkeys(data.keep_columns):
        if name in reserved:
            raise InputError(f"data.keep_columns names {name!r}, which is a result column ({', '.join(reserved)}); "
                             f"rename that input column, or drop it from data.keep_columns")
        if name not in schema.names:
            raise InputError(f"{path}: no column {name!r} to keep (data.keep_columns); the columns are "
                             f"{schema.names}; keep only columns every input file has")
        kind = schema.field(name).type
        out[name] = kind.value_type if pa.types.is_dictionary(kind) else kind  # categoricals are their values
    return out


def _footer(path: Path) -> tuple[pa.Schema, int, os.stat_result]:
    """A file's schema and row count (one read of its footer), and its size and time."""
    pf = _open(path)
    return pf.schema_arrow, pf.metadata.num_rows, path.stat()


def _footers(paths: list[Path], chunk: int = 64) -> Iterator[tuple[pa.Schema, int, os.stat_result]]:
    """Every file's footer, in order. Runs of files are read by a few threads at once (on a shared
    filesystem each read waits on the network; on a local disk it costs what one thread does), and the
    first file that cannot be read, in order, is the one named."""
    workers = min(8, os.cpu_count() or 1, -(-len(paths) // chunk))
    if workers < 2:
        yield from map(_footer, paths)
        return
    from concurrent.futures import ThreadPoolExecutor

    def run(part: list[Path]) -> list:
        return [_footer(path) for path in part]

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="footers") as pool:
        for part in pool.map(run, [paths[i:i + chunk] for i in range(0, len(paths), chunk)]):
            yield from part


CONFIG_KEY = {"max_tokens": "sampling.tokens_to_generate", "temperature": "sampling.temperature",
              "top_p": "sampling.top_p", "seed": "sampling.seed"}  # what a null value of a sampling column is


def _sampling_types(path: Path, schema: pa.Schema, data: DataConfig) -> dict[str, pa.DataType]:
    """data.sampling_columns in one file: each column must exist and hold integers (max_tokens, seed) or
    numbers (temperature, top_p); its values are kept in the results, under its name."""
    out = {}
    for key, name in (data.sampling_columns or {}).items():
        kind = _column(path, schema, f"data.sampling_columns.{key}", name)
        value = kind.value_type if pa.types.is_dictionary(kind) else kind
        if name in RESULT_COLUMNS:
            raise InputError(f"data.sampling_columns.{key}={name!r} is a result column's name "
                             f"({', '.join(RESULT_COLUMNS)}); rename that input column")
        integers = key in ("max_tokens", "seed")
        if not (pa.types.is_integer(value) or pa.types.is_null(value) or
                (not integers and pa.types.is_floating(value))):
            want = "integers" if integers else "numbers"
            raise InputError(f"{path}: column {name!r} (data.sampling_columns.{key}) has type {kind}; it must hold "
                             f"{want} (one {key} per row, null for the config's {CONFIG_KEY[key]}). Cast it (e.g. "
                             f"df[{name!r}].astype({'Int64' if integers else 'float'!r})), or point "
                             f"data.sampling_columns.{key} at another column")
        out[name] = value
    return out


def check_schema_column(path: Path, schema: pa.Schema, data: DataConfig) -> None:
    """data.schema_column is a text column of every input file (from its footer)."""
    column = data.schema_column
    if not column:
        return
    if column not in schema.names:
        raise InputError(f"{path}: no schema column {column!r} (data.schema_column); the columns are "
                         f"{schema.names}; set data.schema_column=<one of them>, or leave it unset")
    if not _is_text(kind := schema.field(column).type):
        raise InputError(f"{path}: schema column {column!r} (data.schema_column) has type {kind}, not text; store "
                         f"each row's JSON schema as JSON text (or null: sampling.json_schema)")
