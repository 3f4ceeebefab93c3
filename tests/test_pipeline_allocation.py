"""A share of one Slurm allocation (cluster.nodes, cluster.nodelist with cluster=allocation), and a pipeline
whose run stages run at the same time inside one allocation, each on its own nodes (orchestrator/pipeline.py,
split_allocation). Fast: the job's environment is faked (SLURM_JOB_ID, SLURM_JOB_NODELIST, and stand-ins for
scontrol and srun on PATH); the real case, `sbatch -N 2` of `orchestrator pipeline`, is in
tests/test_slurm_allocation.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.clusters.allocation import ADAPTER, StepExecutor, run_nodes
from orchestrator.config import compose
from orchestrator.engines.base import adapter_for
from orchestrator.errors import ConfigError
from orchestrator.pipeline import _run_config, run_pipeline, split_allocation
from orchestrator.pipeline_config import load_pipeline
from orchestrator.rundir import RunPaths

SMALL = ["cluster=allocation", "engine=mock", "model=nemotron_mini_4b_instruct", "layout.nodes=1",
         "layout.gpus_per_node=8", "layout.tensor_parallel=8"]


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A four-node job (n1..n4) as the front-end sees it inside `sbatch -N 4`: its variables, an scontrol that
    expands its node list, and an srun that records its argv (argv.jsonl) and exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.jsonl"
    recorder = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"open({str(record)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:])"
                " + '\\n')\n")
    (bin_dir / "scontrol").write_text(recorder + "assert sys.argv[1:] == ['show', 'hostnames', 'n[1-4]']\n"
                                                 "print('n1\\nn2\\nn3\\nn4')\n")
    (bin_dir / "srun").write_text(recorder)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    for name in ("SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE",
                 "SLURM_GPUS_PER_NODE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-4]")
    return record


def problems(*overrides: str) -> list[str]:
    cfg = compose([*SMALL, *overrides])
    return ADAPTER.problems(cfg, adapter_for(cfg))


# --- the keys ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["cluster=local", "cluster.nodes=1"], "cluster.nodes is the share of your own Slurm job that cluster=allocation "
                                           "uses; with cluster=local it means nothing"),
    (["cluster=slurm", "cluster.nodelist=[n1]"], "cluster.nodelist is the share of your own Slurm job"),
    (["cluster=allocation", "cluster.nodes=0"], "cluster.nodes=0 is out of range; it must be >= 1"),
    (["cluster=allocation", "cluster.nodes=1", "cluster.nodelist=[n1,n2]"],
     "cluster.nodes=1 but cluster.nodelist names 2 node(s) (n1, n2)"),
    (["cluster=allocation", "cluster.nodelist=[n1,n1]"], "names a node twice"),
])
def test_the_share_keys_are_checked_when_composed(overrides, words):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert words in str(err.value)


def test_the_allocation_yaml_leaves_every_node_to_the_run():
    cfg = compose(["cluster=allocation"])
    assert cfg.cluster.nodes is None and cfg.cluster.nodelist == []


# --- cluster=allocation on a share ---------------------------------------------------------------------------

def test_a_run_uses_all_nodes_its_first_n_or_exactly_the_named_ones(job):
    assert run_nodes(compose(SMALL)) == ["n1", "n2", "n3", "n4"]
    assert run_nodes(compose([*SMALL, "cluster.nodes=2"])) == ["n1", "n2"]
    assert run_nodes(compose([*SMALL, "cluster.nodelist=[n4,n2]"])) == ["n4", "n2"]
    cfg = compose([*SMALL, "cluster.nodes=3"])
    assert ADAPTER.replicas(cfg, adapter_for(cfg)) == 3  # replicas fit into the share, not the job
    assert problems("cluster.nodes=3") == []


def test_the_refusals_count_the_share_not_the_job(job):
    (said,) = problems("cluster.nodes=1", "layout.nodes=2")
    assert said == ("this run's share of job 77 (cluster.nodes=1) is 1 node(s), and one replica of "
                    "nemotron_mini_4b_instruct needs layout.nodes=2: 1 // 2 = 0 replicas fit. Give it cluster.nodes=2 "
                    "(or a multiple of it), or choose a layout on fewer nodes (orchestrator plan lists them)")
    (said,) = problems("cluster.nodelist=[n2,n3]", "replicas=3")
    assert said.startswith("replicas=3 does not fit this run's share of job 77 (cluster.nodelist=n2,n3): 2 node(s) "
                           "// layout.nodes=1 = 2 replica(s). Give it cluster.nodes=3")
    (said,) = problems("cluster.nodes=5")
    assert said == ("cluster.nodes=5 but job 77 holds 4 node(s): submit with sbatch -N 5, or lower cluster.nodes "
                    "(null: all of the job's nodes)")
    (said,) = problems("cluster.nodelist=[n3,n9]")
    assert said.startswith("cluster.nodelist names n9, not node(s) of job 77 (it holds n1, n2, n3, n4)")
    # without a share the message counts the job, as before
    (said,) = problems("layout.nodes=8")
    assert said.startswith("job 77 holds 4 node(s), and one replica") and "Submit with sbatch -N 8" in said


class FakeNodeJob:
    """What StepExecutor.submit reads of a NodeJob: args[2] (the attempt) and args[4] (the replica)."""

    def __init__(self, replica: int):
        self.args = (None, None, 0, None, replica)


def test_each_replica_step_runs_on_its_nodes_of_the_share(job, tmp_path):
    cfg = compose([*SMALL, "cluster.nodelist=[n3,n4]", "cluster.job_name=orchestrator-score",
                   f"run_dir={tmp_path / 'run'}"])
    executor = StepExecutor(cfg, RunPaths(Path(cfg.run_dir)))
    for replica in (0, 1):
        executor.submit(FakeNodeJob(replica)).proc.wait(timeout=30)
    sruns = [argv for argv in map(json.loads, job.read_text().splitlines()) if argv[0] == "srun"]
    assert [next(a for a in argv if a.startswith("--nodelist=")) for argv in sruns] == ["--nodelist=n3",
                                                                                       "--nodelist=n4"]
    assert "--job-name=orchestrator-score-r1" in sruns[1]
    with pytest.raises(Exception, match=r"replica 2 needs 1 node\(s\); this run has 2 of the allocation \(n3, n4\)"):
        executor.submit(FakeNodeJob(2))


# --- a pipeline inside one allocation ------------------------------------------------------------------------

def write_pipeline(path: Path, src: str, generate: list[str], score: list[str], third: bool = False) -> Path:
    stages = [{"name": "generate", "overrides": [f"data.input={src}", "sampling.rollouts=2", "sampling.greedy=false",
                                                 *generate]},
              {"name": "score", "from": "generate", "overrides": ["data.prompt_column=response",
                                                                     "data.keep_columns=[rollout]", *score]}]
    if third:
        stages += [{"name": "keep", "from": "score", "filter": "output_tokens > 0"},
                   {"name": "judge", "from": "keep", "overrides": ["data.prompt_column=response", "cluster.nodes=1"]}]
    path.write_text(json.dumps({"stages": stages}))
    return path


def load(tmp_path, generate, score, third=False, every=SMALL):
    """The pipeline, `every` on its command line (for every run stage, after the stage's own)."""
    file = write_pipeline(tmp_path / "p.yaml", str(tmp_path / "in.parquet"), generate, score, third)
    return load_pipeline(file, [*every, f"run_dir={tmp_path / 'p'}"])


def test_run_stages_get_consecutive_slices_in_stage_order(tmp_path):
    pipeline = load(tmp_path, ["cluster.nodes=1"], ["cluster.nodes=2"], third=True)
    slices = split_allocation(pipeline, "77", ["n1", "n2", "n3", "n4", "n5"])
    assert slices == {"generate": ["n1"], "score": ["n2", "n3"], "judge": ["n4"]}
    cfg = _run_config(pipeline, pipeline.stage("score"), slices["score"])
    assert cfg.cluster.nodelist == ["n2", "n3"] and cfg.cluster.nodes == 2
    assert cfg.cluster.job_name == "orchestrator-score"  # two stages' steps in one job never share a name
    assert cfg.data.follow == str(tmp_path / "p" / "generate")
    first = _run_config(pipeline, pipeline.stage("generate"), slices["generate"])
    assert first.cluster.nodelist == ["n1"] and first.cluster.job_name == "orchestrator-generate"


def test_a_single_run_stage_keeps_the_whole_allocation(tmp_path):
    file = tmp_path / "one.yaml"
    file.write_text(json.dumps({"stages": [{"name": "generate", "overrides": [f"data.input={tmp_path}/in.parquet"]},
                                           {"name": "keep", "from": "generate", "filter": "output_tokens > 0"}]}))
    pipeline = load_pipeline(file, [*SMALL, f"run_dir={tmp_path / 'p'}"])
    assert split_allocation(pipeline, "77", ["n1", "n2"]) == {}
    assert _run_config(pipeline, pipeline.stage("generate"), None).cluster.nodelist == []


def test_two_stages_that_do_not_both_say_their_nodes_are_refused_when_loaded(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, ["cluster.nodes=1"], [])
    assert str(err.value) == (
        f"{tmp_path / 'p.yaml'}: run stages generate, score run at the same time inside one allocation "
        f"(cluster=allocation), and score says no cluster.nodes: they would compete for the same nodes. Give each "
        f"of generate, score its share (cluster.nodes=N in its overrides; together at most the job's nodes)")
    with pytest.raises(ConfigError, match="generate, score say no cluster.nodes"):
        load(tmp_path, [], [])
    with pytest.raises(ConfigError, match=r"stage\(s\) score set cluster.nodelist; .* drop cluster.nodelist and "
                                          r"say cluster.nodes=N"):
        load(tmp_path, ["cluster.nodes=1"], ["cluster.nodelist=[n2]"])
    # one run stage elsewhere (cluster=slurm) leaves a single stage in the allocation: no share needed
    mixed = load(tmp_path, ["cluster=allocation"], ["cluster=slurm", "cluster.partition=debug"], every=SMALL[1:])
    assert [mixed.stage(s).config.cluster.name for s in ("generate", "score")] == ["allocation", "slurm"]
    assert split_allocation(mixed, "77", ["n1", "n2"]) == {}


def test_shares_that_exceed_the_allocation_are_refused_naming_stages_and_counts(tmp_path):
    pipeline = load(tmp_path, ["cluster.nodes=2"], ["cluster.nodes=1"])
    with pytest.raises(ConfigError) as err:
        split_allocation(pipeline, "77", ["n1", "n2"])
    assert str(err.value) == (
        f"{tmp_path / 'p.yaml'}: run stages generate (cluster.nodes=2), score (cluster.nodes=1) run at the same "
        f"time inside job 77 and need 3 node(s) together; the job holds 2 (n1, n2). Lower their cluster.nodes to "
        f"sum to at most 2, or submit with sbatch -N 3")
    with pytest.raises(ConfigError, match=r"runs inside a Slurm job \(SLURM_JOB_ID is not set\): put `orchestrator "
                                          r"pipeline` in a script you submit with sbatch -N 3"):
        split_allocation(pipeline, None, [])


def test_run_pipeline_refuses_before_anything_runs(job, tmp_path):
    pipeline = load(tmp_path, ["cluster.nodes=3"], ["cluster.nodes=2"])
    with pytest.raises(ConfigError, match=r"need 5 node\(s\) together; the job holds 4 \(n1, n2, n3, n4\)"):
        run_pipeline(pipeline, show_progress=False)
    assert not (tmp_path / "p").exists()  # no stage directory, no job step
    assert not any(json.loads(line)[0] == "srun" for line in job.read_text().splitlines())


def test_run_pipeline_outside_a_job_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    pipeline = load(tmp_path, ["cluster.nodes=1"], ["cluster.nodes=1"])
    with pytest.raises(ConfigError, match=r"run stages generate \(cluster.nodes=1\), score \(cluster.nodes=1\) run "
                                          r"with cluster=allocation, which runs inside a Slurm job"):
        run_pipeline(pipeline, show_progress=False)
    assert not (tmp_path / "p").exists()
