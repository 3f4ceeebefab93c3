"""A pipeline streaming across two Slurm jobs on the local cluster (scripts/local_slurm.sh): generate on n1,
score on n2, the scoring job submitted and committing while generation runs; a `scancel` of the scoring job
mid-way, then a rerun of the pipeline: every (id, rollout) exactly once in both stages."""
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.test_slurm import EXE, SLOW_SLURM, committed_units, first_job_id, sacct_state, wait_for

pytestmark = pytest.mark.slurm

PROMPTS, ROLLOUTS = 80, 2


def pipeline_file(tmp_path: Path, partition: str) -> Path:
    src = write_prompts(tmp_path / "in.parquet", PROMPTS)
    slurm = ["cluster=slurm", f"cluster.partition={partition}", *SLOW_SLURM]
    stages = [
        {"name": "generate", "overrides": [*slurm, "+cluster.sbatch_args.nodelist=n1", f"data.input={src}",
                                           "engine=mock", f"sampling.rollouts={ROLLOUTS}", "sampling.greedy=false",
                                           "data.keep_columns=[prompt]", "engine.simulator.request_latency_s=0.2"]},
        {"name": "score", "from": "generate",  # a scoring model on the embedded engine's reward routes
         "overrides": [*slurm, "+cluster.sbatch_args.nodelist=n2", "model.attributes=[helpfulness,correctness]",
                       "engine=mock", "engine.protocol=reward", "data.keep_columns=[rollout,prompt,response]",
                       "engine.simulator.request_latency_s=0.6", "data.unit_rows=40"]},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"stages": stages}))
    return path


def parts(results: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in results.glob("part-*.parquet")}


def node_of(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList"], capture_output=True, text=True,
                         timeout=60).stdout.split()
    return out[0] if out else ""


def test_two_jobs_stream_and_a_scancelled_scoring_job_resumes_exactly_once(slurm_cluster, tmp_path):
    file, root = pipeline_file(tmp_path, slurm_cluster), tmp_path / "p"
    cmd = [EXE, "pipeline", str(file), f"run_dir={root}"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gen_units = PROMPTS // 20
        # the scoring job commits while generation still runs: streaming across two jobs
        def scored() -> bool:
            assert first.poll() is None, "the pipeline ended before scoring committed: " + "".join(first.communicate())
            return committed_units(root / "score") >= 1

        wait_for(scored, 240, "the scoring job's first commit")
        assert committed_units(root / "generate") < gen_units, "generation ended before scoring committed anything"
        score_job, gen_job = first_job_id(root / "score"), first_job_id(root / "generate")
        assert (node_of(gen_job), node_of(score_job)) == ("n1", "n2")
        subprocess.run(["scancel", score_job], check=True, timeout=60)
        out, err = first.communicate(timeout=300)
        assert first.returncode != 0, out + err
        assert "stage 'score' failed" in out + err, out + err
        assert sacct_state(score_job) == "CANCELLED"
    finally:  # a failed assertion leaves no pipeline running (SIGTERM: it cancels its stages' jobs)
        if first.poll() is None:
            first.terminate()
            first.communicate(timeout=120)
    score_units = PROMPTS * ROLLOUTS // 40
    before = parts(root / "score" / "results")
    assert 1 <= len(before) < score_units, "the scancel came after scoring had ended"
    assert committed_units(root / "generate") == gen_units  # generation went on to the end meanwhile

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    gen, score = pd.read_parquet(root / "generate" / "results"), pd.read_parquet(root / "score" / "results")
    keys = sorted((f"q{i}", r) for i in range(PROMPTS) for r in range(ROLLOUTS))
    assert sorted(zip(gen.id, gen.rollout)) == keys
    assert sorted(zip(score.id, score.rollout)) == keys  # each answer scored once
    answers = gen.set_index(["id", "rollout"]).response
    assert all(answers[(r.id, r.rollout)] == r.response for r in score.itertuples())
    assert score.helpfulness.notna().all() and score.correctness.notna().all()
    after = parts(root / "score" / "results")
    assert {name: after[name] for name in before} == before  # the units committed before the scancel stay as they were
    assert len(after) == score_units
