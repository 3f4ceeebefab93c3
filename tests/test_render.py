"""`orchestrator render`: what would be submitted, compared with saved reference files, and quoting."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import compose
from orchestrator.render import render
from tests.conftest import write_prompts

REFERENCE = Path(__file__).parent / "reference" / "render_nemo_340b"
REFRESH = "ORCHESTRATOR_REFRESH_REFERENCE"
SEED_340B = ("python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py "
             "gpt_model_file=/models/Nemotron-4-340B-Instruct.nemo pipeline_model_parallel_split_rank=0 server=True "
             "tensor_model_parallel_size=8 pipeline_model_parallel_size=2 trainer.precision=bf16 trainer.devices=8 "
             "trainer.num_nodes=2 web_server=False port=")


def render_340b(run_dir: Path, *extra: str) -> dict[str, str]:
    cfg = compose(["cluster=slurm", "engine=nemo", "engine.checkpoint=/models/Nemotron-4-340B-Instruct.nemo",
                   "cluster.partition=batch", "cluster.account=llm",
                   "cluster.container_image=nvcr.io/nvidia/nemo:24.05",
                   "cluster.container_mounts=[/lustre/models:/models]", f"run_dir={run_dir}",
                   "data.input=/lustre/prompts", *extra])
    return {p.name: p.read_text() for p in render(cfg)}


def normalise(text: str, run_dir: Path) -> str:
    return text.replace(str(run_dir), "<RUN_DIR>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize("name", ["job.sbatch", "engine_ranks.sh", "engine_job.sbatch"])
def test_render_matches_the_saved_reference(tmp_path, name):
    run_dir = tmp_path / "run"
    assert_matches_reference(normalise(render_340b(run_dir)[name], run_dir), REFERENCE / name)


def assert_matches_reference(got: str, ref: Path) -> None:
    if os.environ.get(REFRESH) == "1":
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(got)
    assert ref.exists(), f"no reference {ref}; create it with {REFRESH}=1 pytest {__file__}"
    assert got == ref.read_text(), (f"{ref.name} differs from {ref}; if the change is intended, refresh with "
                                    f"{REFRESH}=1 pytest {__file__} and review the diff")


def test_the_340b_engine_line_is_the_seed_recipe(tmp_path):
    files = render_340b(tmp_path / "run")
    assert SEED_340B in files["engine_ranks.sh"] and SEED_340B in files["engine_job.sbatch"]
    plain = files["engine_job.sbatch"]
    for flag in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert flag in plain
    assert "--container-image=nvcr.io/nvidia/nemo:24.05 --container-mounts=/lustre/models:/models" in plain
    job = files["job.sbatch"]
    assert "#SBATCH --nodes=2" in job and "#SBATCH --ntasks-per-node=1" in job and "#SBATCH --gpus-per-node=8" in job
    step = files["engine_ranks.sh"]
    for flag in ("--overlap", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--distribution=block",
                 "--kill-on-bad-exit=1", "--container-image=nvcr.io/nvidia/nemo:24.05"):
        assert flag in step
    assert step.count("SLURM_NTASKS=16") == 16 and "SLURM_PROCID=15 SLURM_LOCALID=7 SLURM_NODEID=1" in step


HOSTILE = "a b; $(touch {m}) 'q' \"d\" `touch {m}`"


def test_hostile_values_reach_scripts_quoted(tmp_path):
    marker = tmp_path / "pwned"
    bad = HOSTILE.format(m=marker)
    q = "'" + bad.replace("'", "\\'") + "'"
    files = render_340b(tmp_path / "run", f"cluster.partition={q}", f"cluster.job_name={q}",
                        f"cluster.container_image={q}", f"cluster.container_workdir={q}", f"engine.checkpoint={q}",
                        f"cluster.container_mounts=[{q}]", f"+cluster.sbatch_args.comment={q}")
    for name in ("job.sbatch", "engine_job.sbatch", "engine_ranks.sh"):
        path = tmp_path / name
        path.write_text(files[name])
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, name
    for name in ("job.sbatch", "engine_job.sbatch"):
        options = [shlex.split(line) for line in files[name].splitlines() if line.startswith("#SBATCH --partition")]
        assert options == [["#SBATCH", f"--partition={bad}"]]
        comments = [shlex.split(line) for line in files[name].splitlines() if line.startswith("#SBATCH --comment")]
        assert comments == [["#SBATCH", f"--comment={bad}"]]
    step = next(line for line in files["engine_ranks.sh"].splitlines() if line.startswith("srun "))
    argv = shlex.split(step)
    for token in (f"--container-image={bad}", f"--container-mounts={bad}", f"--container-workdir={bad}",
                  f"gpt_model_file={bad}"):
        assert token in argv
    assert not marker.exists()


def test_the_plain_template_runs_its_steps_with_exact_arguments(tmp_path):
    """Run the filled template under bash with stand-ins for srun, scontrol and curl that record their argv."""
    marker = tmp_path / "pwned"
    bad = HOSTILE.format(m=marker)
    q = "'" + bad.replace("'", "\\'") + "'"
    src = write_prompts(tmp_path / "in.parquet", 3)
    files = render_340b(tmp_path / "run", f"engine.checkpoint={q}", "engine.ready_timeout_s=1", f"data.input={src}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.jsonl"
    recorder = (f"#!{sys.executable}\nimport json, sys, os\n"
                f"open({str(record)!r}, 'a')"
                ".write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
    (bin_dir / "srun").write_text(recorder + "import time; time.sleep(30)\n")
    (bin_dir / "scontrol").write_text(recorder + "print('127.0.0.1')\n")
    (bin_dir / "curl").write_text(recorder + "print('{\"sentences\": [\"Hello world\"]}')\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "engine_job.sbatch"
    script.write_text(files["engine_job.sbatch"])
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-2]")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    import json

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    srun = next(c for c in calls if c[0] == "srun")
    assert f"gpt_model_file={bad}" in srun and "port=1424" in srun and "--ntasks=16" in srun
    curl = next(c for c in calls if c[0] == "curl")
    assert "http://127.0.0.1:1424/generate" in curl
    # the client ran against the address the script found, and failed fast: nothing listens there
    assert proc.returncode != 0 and "nothing answers at engine.url=http://127.0.0.1:1424" in proc.stderr
    assert not marker.exists()


ENGINE_340B = {  # each engine's 340B line (Triton: its nearest valid layout, one node of H200)
    "vllm": ["engine=vllm", "model.path=/models/Nemotron-4-340B-Instruct-hf"],
    "sglang": ["engine=sglang", "model.path=/models/Nemotron-4-340B-Instruct-hf"],
    "trtllm": ["engine=trtllm", "model.path=/models/Nemotron-4-340B-Instruct-hf"],
    "triton": ["engine=triton", "engine.checkpoint=/models/Nemotron-4-340B-Instruct.nemo",
               "engine.options.model_type=nemotron", "layout.gpu=h200_141gb", "layout.nodes=1",
               "layout.pipeline_parallel=1"],
}


@pytest.mark.parametrize("engine", sorted(ENGINE_340B))
@pytest.mark.parametrize("name", ["engine_ranks.sh", "engine_job.sbatch"])
def test_each_engines_340b_render_matches_its_saved_reference(tmp_path, engine, name):
    run_dir = tmp_path / "run"
    cfg = compose(["cluster=slurm", "model=nemotron4_340b_instruct", "cluster.partition=batch",
                   "cluster.account=llm", f"run_dir={run_dir}", "data.input=/lustre/prompts", *ENGINE_340B[engine]])
    got = normalise({p.name: p.read_text() for p in render(cfg)}[name], run_dir)
    assert_matches_reference(got, Path(__file__).parent / "reference" / f"render_{engine}_340b" / name)


def test_the_plain_template_gives_each_node_its_line_with_the_scripts_values(tmp_path):
    """The engine command of engine_job.sbatch, run as srun would on node 1 with the variables the script
    exports: the rendezvous values are expanded, not passed on as literal '$MASTER_ADDR'."""
    import json
    import re

    record = tmp_path / "argv.json"
    recorder = tmp_path / "engine-program"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    recorder.chmod(0o755)
    cfg = compose(["cluster=slurm", "model=nemotron4_340b_instruct", f"run_dir={tmp_path / 'run'}",
                   "data.input=/lustre/prompts", "engine=vllm", "model.path=/m", f"engine.command=[{recorder}]"])
    text = {p.name: p.read_text() for p in render(cfg)}["engine_job.sbatch"]
    command = re.search(r"\nsrun [^\n]*\\\n    (.*) &\nSERVER=", text, re.S).group(1)
    subprocess.run(["bash", "-c", f"export PORT=4242 MASTER_ADDR=node-a MASTER_PORT=29777; {command}"],
                   env={"SLURM_NODEID": "1", "PATH": "/usr/bin:/bin"}, check=True, timeout=60)
    argv = json.loads(record.read_text())
    assert argv[argv.index("--master-addr") + 1] == "node-a" and argv[argv.index("--master-port") + 1] == "29777"
    assert argv[argv.index("--port") + 1] == "4242" and argv[argv.index("--node-rank") + 1] == "1"
    assert "--headless" in argv


MINI_DP8 = ["model=nemotron_mini_4b_instruct", "model.path=/models/Nemotron-Mini-4B-Instruct", "layout.gpu=h100_80gb",
            "layout.nodes=1", "layout.gpus_per_node=8", "layout.data_parallel=8"]


def render_mini_dp8(run_dir: Path, engine: str) -> dict[str, str]:
    extra = ["engine.checkpoint=/models/Nemotron-Mini-4B-Instruct.nemo"] if engine == "nemo" else []
    cfg = compose(["cluster=slurm", f"engine={engine}", "cluster.partition=batch", "cluster.account=llm",
                   f"run_dir={run_dir}", "data.input=/lustre/prompts", *MINI_DP8, *extra])
    return {p.name: p.read_text() for p in render(cfg)}


@pytest.mark.parametrize("engine,flag", [("vllm", "--data-parallel-size 8"), ("sglang", "--dp-size 8"),
                                         ("nemo", "env CUDA_VISIBLE_DEVICES=7 python3"),
                                         ("trtllm", "env CUDA_VISIBLE_DEVICES=7 trtllm-llmapi-launch")])
@pytest.mark.parametrize("name", ["engine_ranks.sh", "engine_job.sbatch"])
def test_mini_4b_dp8_on_one_node_matches_its_saved_reference(tmp_path, engine, flag, name):
    """Nemotron-Mini-4B as 8 instances of one GPU on one 8-GPU node: one server with the engine's own DP flag
    (vLLM, SGLang), or 8 servers each pinned to its GPU and port (NeMo, TRT-LLM: instances.py)."""
    run_dir = tmp_path / "run"
    got = normalise(render_mini_dp8(run_dir, engine)[name], run_dir)
    assert flag in got and "#SBATCH --gpus-per-node=8" in render_mini_dp8(run_dir, engine)["engine_job.sbatch"]
    assert_matches_reference(got, Path(__file__).parent / "reference" / f"render_{engine}_mini4b_dp8" / name)


@pytest.mark.parametrize("engine", ["nemo", "trtllm"])
def test_pinned_instances_each_get_their_own_gpu_node_and_port_in_the_plain_template(tmp_path, engine):
    """The plain template starts the 8 instances of one GPU each, and its client gets all 8 URLs."""
    import subprocess

    script = render_mini_dp8(tmp_path / "run", engine)["engine_job.sbatch"]
    for k in range(8):
        assert f"PORT=$((BASE_PORT + {k}))" in script and f"env CUDA_VISIBLE_DEVICES={k} " in script
    assert script.count("srun --overlap --relative=0 --nodes=1 --ntasks=1 ") == 8
    assert "\"engine.url='$(IFS=,; echo \"${URLS[*]}\")'\"" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    ranks = render_mini_dp8(tmp_path / "run", engine)["engine_ranks.sh"]
    assert ranks.count("# instance ") == 8 and "# rank 0 on node 0, GPU 5 (serves HTTP)" in ranks


def test_data_parallel_on_an_endpoint_is_refused_before_anything_is_written(tmp_path):
    from orchestrator.errors import ConfigError

    run_dir = tmp_path / "run"
    cfg = compose(["cluster=slurm", "engine=endpoint", "engine.url=http://127.0.0.1:1", f"run_dir={run_dir}",
                   "data.input=/lustre/prompts", *MINI_DP8])
    with pytest.raises(ConfigError, match=r"layout\.data_parallel=8: engine=endpoint talks to a server that is "
                                          r"already running"):
        render(cfg)
    assert not (run_dir / "render").exists()
