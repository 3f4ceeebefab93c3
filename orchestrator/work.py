"""A re-export shim: the unit-of-work plan, reading, and the claim/commit protocol moved by job into rundir (the run
directory's layout and writes), inputs (input discovery and schema checks), duplicates (the duplicate-id scan),
plan (units and plan.json), reader (a unit's rows) and commits (the commit protocol and what results/ holds).
Every name this module had is still importable from here until the imports are switched."""
from __future__ import annotations

from . import fsops  # noqa: F401
from .commits import (  # noqa: F401
    _ID_LIKE, _NUMBER, MAX_ERROR_GROUPS, Committed, Ledger, UnitStats, _footer_stats, _ledger, _retried_marker,
    commit_unit, committed_rows, committed_stats, done_units, error_reason, error_summary, is_committed, kept_rows, log,
    mark_retried, remaining_units, retried, retried_units, retry_units, scan_committed, write_progress,
    write_retry_units)
from .config import DataConfig  # noqa: F401
from .duplicates import (  # noqa: F401
    _SPILL_MAX_BITS, DUPLICATE_SCAN_HASHES, _bucket_bits, _Buckets, _chunks, _HashScratch, _id_batches, _InMemoryHashes,
    _sorted_repeats, find_duplicate_ids)
from .errors import InputError, RunError  # noqa: F401
from .inputs import (  # noqa: F401
    RESULT_COLUMNS, InputFile, _check_conversation_columns, _column, _footer, _footers, _id_type, _is_text,
    _kept_types, _list_value, _open, discover_inputs)
from .plan import (  # noqa: F401
    SEED_SPAN, Plan, Units, _files_from_json, _files_json, apply_duplicate_policy, build_plan, keep_schema,
    result_schema, rollout_seed)
from .reader import UnitReader, read_unit  # noqa: F401
from .rundir import (  # noqa: F401
    RESULT_PREFIX, RunPaths, _write_tmp, atomic_write_text, log_event, publish_once, write_error)
