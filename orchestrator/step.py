"""One replica inside the user's allocation (cluster=allocation): `srun ... python -m orchestrator.step
JOB.pkl` runs this on each of the replica's nodes. The task on the replica's first node runs the same
NodeJob a submitted replica runs; the others return at once. The outcome goes beside the pickle:
JOB.result.json, or JOB.error with the message (never a traceback for an expected failure)."""
from __future__ import annotations

import json
import pickle
import signal
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    from .clusters.environment import job_environment
    from .errors import OrchestratorError

    pkl = Path(argv[0])
    if job_environment().global_rank != 0:
        return 0
    stem = pkl.with_suffix("")
    Path(f"{stem}.error").unlink(missing_ok=True)
    with open(pkl, "rb") as fh:
        job = pickle.load(fh)
    # the allocation's time-limit warning (--signal=USR2@N) stops the replica as SIGTERM does
    signal.signal(signal.SIGUSR2, lambda *_: job._request_stop("time limit or preemption signal (USR2)"))
    try:
        result = job.run_node0()
    except OrchestratorError as exc:
        Path(f"{stem}.error").write_text(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - an unexpected failure keeps its traceback for the log
        Path(f"{stem}.error").write_text("".join(traceback.format_exception(exc)))
        traceback.print_exc()
        return 1
    Path(f"{stem}.result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
