"""Running a pipeline (orchestrator/pipeline.py, `orchestrator pipeline FILE`): run stages in order, a stage
reading another's committed results, selections streamed unit by unit while the runs go on, each stage in its
own directory, exactly once through a kill -9 and a rerun, the funnel in pipeline.json and `status`."""
import json
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.errors import ConfigError, RunError
from orchestrator.pipeline import run_pipeline
from orchestrator.pipeline_config import load_pipeline
from tests.conftest import kill_jobs_when, orchestrator_cmd, write_prompts

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline_local.yaml"


def read(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder / "results")


def write_pipeline(path: Path, src: Path, slow: bool = False) -> Path:
    """generate (2 rollouts) -> judge (a run reading generate's results through a template) -> best and pairs
    by the judge's output_tokens, and a filter on generate."""
    latency = ["engine.simulator.token_latency_s=0.01", "client.max_in_flight=2"] if slow else []
    stages = [
        {"name": "generate", "overrides": [f"data.input={src}", "engine=mock", "sampling.rollouts=2",
                                           "sampling.greedy=false", "sampling.tokens_to_generate=24",
                                           "data.keep_columns=[prompt]", "data.unit_rows=5", *latency]},
        {"name": "short", "from": "generate", "filter": "output_tokens < 12 and status == 'ok'"},
        {"name": "judge", "from": "generate",
         "overrides": ["engine=mock", "data.prompt_template='Rate {{ response }} for {{ prompt }}'",
                       "data.keep_columns=[rollout,prompt]", "sampling.tokens_to_generate=24", "data.unit_rows=10"]},
        {"name": "best", "from": "judge", "best": {"by": "output_tokens", "k": 1}},
        {"name": "pairs", "from": "judge", "pairs": {"by": "output_tokens", "min_margin": 2}},
    ]
    path.write_text(json.dumps({"stages": stages}))  # JSON is YAML
    return path


def check_stages(root: Path) -> None:
    """Every stage's output is what its input and its settings say, each (id, rollout) once."""
    gen = read(root / "generate")
    assert len(gen) == 2 * gen.id.nunique() and not gen.duplicated(["id", "rollout"]).any()
    short = read(root / "short")
    expected = gen[(gen.output_tokens < 12) & (gen.status == "ok")]
    assert sorted(zip(short.id, short.rollout)) == sorted(zip(expected.id, expected.rollout))
    judge = read(root / "judge")  # one judgement per answer, the answer's own rollout kept
    assert sorted(zip(judge.id, judge.rollout)) == sorted(zip(gen.id, gen.rollout))
    best = read(root / "best")
    top = judge.sort_values(["id", "output_tokens", "rollout"], ascending=[True, False, True]).drop_duplicates("id")
    assert sorted(zip(best.id, best.rollout)) == sorted(zip(top.id, top.rollout))
    pairs = read(root / "pairs")
    for row in pairs.itertuples():
        scores = judge[judge.id == row.id].output_tokens
        assert (row.chosen_score, row.rejected_score) == (scores.max(), scores.min())
        assert scores.max() - scores.min() >= 2
    spread = judge.groupby("id").output_tokens.agg(lambda s: s.max() - s.min())
    assert set(pairs.id) == set(spread[spread >= 2].index)


def test_the_local_example_runs_and_each_selection_is_what_its_expression_says(tmp_path):
    funnel = run_pipeline(load_pipeline(EXAMPLE, [f"run_dir={tmp_path / 'p'}", "data.unit_rows=20"]),
                          show_progress=False)
    gen = read(tmp_path / "p" / "generate")
    keep = read(tmp_path / "p" / "keep")
    expected = gen[(gen.finish_reason == "stop") & (gen.output_tokens >= 32)]
    assert sorted(zip(keep.id, keep.rollout)) == sorted(zip(expected.id, expected.rollout))
    assert funnel["generate"]["ok"] == len(gen) == 320
    assert funnel["keep"] == {"kind": "filter", "from": "generate", "rows_in": 320, "kept": len(keep),
                              "dropped_failed": 0, "dropped_null": 0}
    recorded = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert recorded["funnel"] == funnel and [s["name"] for s in recorded["stages"]] == ["generate", "keep",
                                                                                       "longest", "pairs"]


def test_a_run_stage_reads_the_stage_before_and_keeps_its_rollouts(tmp_path):
    """The judge stage reads generate's results (rollouts share an id): one answer per (id, rollout), and the
    kept `rollout` column is generate's, not the judge's own (which has one rollout)."""
    src = write_prompts(tmp_path / "in.parquet", 15)
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.yaml", src), [f"run_dir={tmp_path / 'p'}"])
    run_pipeline(pipeline, show_progress=False)
    check_stages(tmp_path / "p")
    judge = read(tmp_path / "p" / "judge")
    assert set(judge.rollout) == {0, 1}
    gen = read(tmp_path / "p" / "generate").set_index(["id", "rollout"])
    assert all(gen.loc[(row.id, row.rollout), "prompt"] == row.prompt for row in judge.itertuples())


def test_selections_stream_while_generation_runs(tmp_path):
    """A filter's first units are selected before generation's last unit commits."""
    src = write_prompts(tmp_path / "in.parquet", 20)
    run_pipeline(load_pipeline(write_pipeline(tmp_path / "p.yaml", src, slow=True), [f"run_dir={tmp_path / 'p'}"]),
                 show_progress=False)
    selected = min(p.stat().st_mtime for p in (tmp_path / "p" / "short" / "results").glob("part-*.parquet"))
    committed = max(p.stat().st_mtime for p in (tmp_path / "p" / "generate" / "results").glob("part-*.parquet"))
    assert selected < committed
    check_stages(tmp_path / "p")


def test_kill_9_mid_pipeline_then_rerun_gives_every_stage_exactly_once(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 20)
    file = write_pipeline(tmp_path / "p.yaml", src, slow=True)
    root = tmp_path / "p"
    cmd = [*orchestrator_cmd(), "pipeline", str(file), f"run_dir={root}"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    generate, judge = root / "generate" / "results", root / "judge" / "results"
    # the judge follows generate: killed once it has judged a unit, while generate still has units to commit
    kill_jobs_when(first, root / "generate", lambda: len(list(judge.glob("part-*"))) >= 1, sig=signal.SIGKILL,
                   front_end=True, also=[root / "judge"])
    assert len(list(generate.glob("part-*"))) < 4, "generate ended before the kill: nothing was streamed"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    check_stages(root)
    status = subprocess.run([*orchestrator_cmd(), "status", str(root)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "judge (run, from generate): 40/40 ok" in status.stdout
    assert "pairs (pairs, from judge):" in status.stdout
    found = json.loads(subprocess.run([*orchestrator_cmd(), "status", str(root), "--json"], capture_output=True,
                                      text=True, timeout=60).stdout)
    by_name = {s["name"]: s for s in found["stages"]}
    assert by_name["judge"]["status"]["rows"]["ok"] == 40 and by_name["generate"]["status"]["rows"]["total"] == 40
    judged = len(list((root / "judge" / "results").glob("part-*.parquet")))
    assert by_name["best"]["units_selected"] == judged and by_name["best"]["kept"] == len(read(root / "best"))


def test_a_rerun_with_other_selection_settings_is_refused(tmp_path):
    run_pipeline(load_pipeline(EXAMPLE, [f"run_dir={tmp_path / 'p'}", "data.unit_rows=40"]), show_progress=False)
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("output_tokens >= 32", "output_tokens >= 8"))
    with pytest.raises(ConfigError, match=r"stage 'keep': .* was selected with other settings .*output_tokens >= 32"
                                          r".*give the pipeline another run_dir"):
        run_pipeline(load_pipeline(changed, [f"run_dir={tmp_path / 'p'}", "data.unit_rows=40"]), show_progress=False)


def test_a_failing_stage_is_named_and_the_selections_keep_what_it_committed(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", 10)
    file = tmp_path / "p.yaml"
    file.write_text(json.dumps({"stages": [
        {"name": "generate", "overrides": [f"data.input={src}", "engine=mock", "data.unit_rows=5"]},
        {"name": "kept", "from": "generate", "filter": "status == 'ok'"},
        {"name": "score", "from": "generate", "overrides": ["engine=endpoint", "engine.url=http://127.0.0.1:9",
                                                            "data.prompt_column=response",
                                                            "engine.ready_timeout_s=5"]}]}))
    with pytest.raises(RunError, match=r"(?s)stage 'score' failed: .*nothing answers at engine.url"):
        run_pipeline(load_pipeline(file, [f"run_dir={tmp_path / 'p'}"]), show_progress=False)
    assert len(read(tmp_path / "p" / "kept")) == 10


def test_the_cli_refuses_a_bad_pipeline_before_anything_runs(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("stages:\n  - name: keep\n    from: nowhere\n    filter: \"x > 1\"\n")
    done = subprocess.run([*orchestrator_cmd(), "pipeline", str(file), f"run_dir={tmp_path / 'p'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "stage 'keep'" in done.stderr and "nothing before it" in done.stderr
    assert not (tmp_path / "p").exists()


SDG = Path(__file__).resolve().parent.parent / "examples" / "pipeline_sdg_340b.yaml"
SDG_REFERENCE = Path(__file__).parent / "reference" / "pipeline_sdg_340b"
CLUSTER = ["data.input=/lustre/prompts", "cluster=slurm", "cluster.partition=batch", "cluster.account=llm",
           "cluster.container_image=nvcr.io/nvidia/nemo:24.05", "cluster.container_mounts=[/lustre/models:/models]"]


@pytest.mark.parametrize("stage", ["generate", "score"])
@pytest.mark.parametrize("name", ["job.sbatch", "engine_ranks.sh", "engine_job.sbatch"])
def test_the_340b_sdg_pipeline_renders_as_the_saved_reference(tmp_path, stage, name):
    """340B-Instruct on NeMo's server, then 340B-Reward on NeMo-Aligner's, each on 2 x 8 GPUs (TP8 PP2)."""
    from orchestrator.pipeline import render_pipeline
    from tests.test_render import assert_matches_reference, normalise

    root = tmp_path / "sdg"
    written = {(p.parent.parent.name, p.name): p for p in render_pipeline(load_pipeline(SDG, [f"run_dir={root}",
                                                                                           *CLUSTER]))}
    assert_matches_reference(normalise(written[(stage, name)].read_text(), root), SDG_REFERENCE / stage / name)


def test_the_sdg_recipe_generates_scores_and_pairs_on_the_embedded_engine(tmp_path):
    """The 340B recipe's shape on the embedded engine (examples/pipeline_sdg_local.yaml, its reward routes): every
    (id, rollout) scored once with the 9 attributes, the pairs right for the scores stored."""
    src = write_prompts(tmp_path / "in.parquet", 12)
    file = EXAMPLE.parent / "pipeline_sdg_local.yaml"
    run_pipeline(load_pipeline(file, [f"run_dir={tmp_path / 'p'}", f"data.input={src}", "data.unit_rows=4"]),
                 show_progress=False)
    gen, score = read(tmp_path / "p" / "generate"), read(tmp_path / "p" / "score")
    assert sorted(zip(score.id, score.rollout)) == sorted(zip(gen.id, gen.rollout))
    assert {"quality", "helpfulness", "verbosity"} <= set(score.columns) and score.helpfulness.notna().all()
    answers = gen.set_index(["id", "rollout"])  # the scored answer and how it ended are the generation's
    assert all(answers.loc[(r.id, r.rollout), "response"] == r.response and
               answers.loc[(r.id, r.rollout), "finish_reason"] == r.finish_reason for r in score.itertuples())
    assert set(score.finish_reason) == {"stop", "length"}  # tokens_to_generate cuts some: both kinds to filter
    keep = read(tmp_path / "p" / "keep")
    expected = score[(score.helpfulness >= 2) & (score.finish_reason == "stop")]
    assert len(keep) > 0 and sorted(zip(keep.id, keep.rollout)) == sorted(zip(expected.id, expected.rollout))
    for pair in read(tmp_path / "p" / "pairs").itertuples():
        mine = score[score.id == pair.id]
        best, worst = mine.loc[mine.helpfulness.idxmax()], mine.loc[mine.helpfulness.idxmin()]
        assert (pair.chosen, pair.rejected) == (best.response, worst.response)
        assert pair.chosen_score - pair.rejected_score >= 0.5
