"""Re-exports of what launch.py held before it was split by job (issue 18): the checks before submission
in preflight.py, the job's code in node.py, the front-end in frontend.py, the run_dir's lock in runlock.py,
`orchestrator render` in render.py, the summaries in report.py. Import from those; this shim goes away."""
from __future__ import annotations

from .frontend import (TERMINAL_STATES, FrontEndStopped, Interrupted, Submission, _raise_on_stop_signals,  # noqa: F401
                       _submit, _submit_group, follow, make_executor, report_submitted, run, submit, submit_jobs,
                       wait_for_jobs)
from .node import NodeJob, Preempted, engine_server  # noqa: F401
from .preflight import (_check_same_settings, _differences, _input_changes, _nemo_copies,  # noqa: F401
                        check_engine_identity, check_launch, check_writable, fingerprint, prepare)
from .render import render  # noqa: F401
from .report import _failed_summary, _final_summary, _kept_summary, _summary_extra  # noqa: F401
from .runlock import RunLock, _incarnation  # noqa: F401
