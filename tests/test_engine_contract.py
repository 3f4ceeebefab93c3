"""The contract every engine adapter passes (in the spirit of Hydra's LauncherTestSuite): a new engine is
one file in orchestrator/engines/ plus one YAML in conf/engine/, and is done when this suite passes."""
import json
import shlex
import subprocess
import sys

import pytest

from orchestrator.config import PROTOCOLS, choices, compose
from orchestrator.engines.base import EngineAdapter, Rendezvous, adapter_for, check_engine
from orchestrator.errors import ConfigError
from orchestrator.render import render

ENGINES = choices("engine")
HOSTILE = "/models/a dir/it's $(touch {m}) `x`; \"q\""


def required(engine: str, **values) -> list[str]:
    """What every engine may need to be valid: a checkpoint (NeMo), a HF directory, a URL (endpoint)."""
    adapter = adapter_for(compose([f"engine={engine}", "engine.url=http://127.0.0.1:9"]) if engine == "endpoint"
                          else compose([f"engine={engine}"]))
    q = lambda v: "'" + v.replace("'", "\\'") + "'"  # noqa: E731 - Hydra quoting
    out = [f"engine={engine}", f"model.path={q(values.get('path', '/models/hf'))}",
           f"engine.checkpoint={q(values.get('checkpoint', '/models/m.nemo'))}"]
    if not adapter.starts_process:
        out.append("engine.url=http://127.0.0.1:9")
    if adapter.protocol == "reward":  # a scoring engine (nemo_reward) serves a model that lists its outputs
        out.append("model.attributes=[helpfulness,verbosity]")
    return out


def test_every_engine_yaml_has_an_adapter():
    assert {"mock", "nemo", "vllm", "sglang", "trtllm", "triton", "endpoint"} <= set(ENGINES)
    for name in ENGINES:
        adapter = adapter_for(compose(required(name)))
        assert isinstance(adapter, EngineAdapter) and adapter.name == name


def test_an_engine_without_an_adapter_is_named_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="engine.name='nope' is not valid; choose one of: endpoint, mock"):
        compose(["engine.name=nope"])


@pytest.mark.parametrize("engine", ENGINES)
class TestEngineContract:
    def test_valid_config_has_no_problems_and_a_known_protocol(self, engine):
        cfg = compose(required(engine) + ["model=llama2_70b_steerlm_chat"])  # one node: every engine runs it
        adapter = check_engine(cfg)
        assert adapter.protocol_for(cfg) in (*PROTOCOLS, None)
        assert adapter.protocol_for(cfg) is not None or not adapter.starts_process  # only endpoint detects

    def test_tasks_per_node_is_one_per_gpu_or_one_per_node(self, engine):
        cfg = compose(required(engine) + ["model=nemotron4_340b_instruct"])
        adapter = adapter_for(cfg)
        tasks = adapter.tasks_per_node(cfg)
        if adapter.starts_process:
            assert tasks == (cfg.layout.gpus_per_node if adapter.per_gpu_tasks else 1)

    def test_servers_bind_loopback_unless_told_otherwise(self, engine):
        cfg = compose(required(engine))
        adapter = adapter_for(cfg)
        if adapter.starts_process and not adapter.binds_all_interfaces:
            assert cfg.engine.host == "127.0.0.1"
            argv = adapter.node_argv(cfg, 0, Rendezvous(1234, "head", 29500))
            assert "0.0.0.0" not in argv

    def test_the_340b_layout_renders_on_slurm_or_is_refused_with_the_reason(self, engine, tmp_path):
        cfg = compose(required(engine) + ["model=nemotron4_340b_instruct", "cluster=slurm",
                                          f"run_dir={tmp_path / 'run'}"])
        adapter = adapter_for(cfg)
        if adapter.max_nodes is not None and adapter.max_nodes < cfg.layout.nodes:
            with pytest.raises(ConfigError, match=f"engine={engine} runs on at most"):
                render(cfg)
            return
        files = {p.name: p.read_text() for p in render(cfg)}
        if not adapter.starts_process:
            assert set(files) == {"config.yaml"}
            return
        for name in ("job.sbatch", "engine_ranks.sh", "engine_job.sbatch"):
            path = tmp_path / name
            path.write_text(files[name])
            assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, name
        tasks = adapter.tasks_per_node(cfg)
        assert f"--ntasks={2 * tasks}" in files["engine_ranks.sh"]
        assert f"--ntasks-per-node={tasks}" in files["engine_ranks.sh"]
        assert files["engine_ranks.sh"].count("SLURM_PROCID=") == 2 * tasks

    def test_missing_requirements_are_named_before_submission(self, engine):
        cfg = compose([f"engine={engine}"] + (["engine.url=http://127.0.0.1:9"] if engine == "endpoint" else []))
        adapter = adapter_for(cfg)
        found = adapter.problems(cfg)
        if adapter.needs_hf_checkpoint:
            assert any("model.path=" in p for p in found)
        if adapter.needs_nemo_checkpoint:
            assert any("engine.checkpoint=" in p for p in found)
        if adapter.starts_process:
            bad = compose([f"engine={engine}", "engine.url=http://127.0.0.1:9"])
            assert any("engine=endpoint" in p for p in adapter.problems(bad))

    def test_each_node_runs_its_own_line_through_the_step_quoted(self, engine, tmp_path):
        """Run the step command as srun's tasks would (SLURM_NODEID set), with a recorder as the engine
        program and hostile paths: every node gets exactly its adapter's argv, and nothing is executed."""
        marker = tmp_path / "pwned"
        hostile = HOSTILE.format(m=marker)
        record = tmp_path / "argv.jsonl"
        recorder = tmp_path / "engine-program"
        recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                            f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
        recorder.chmod(0o755)
        cfg = compose(required(engine, path=hostile, checkpoint=hostile) +
                      ["model=nemotron4_340b_instruct", f"engine.command=[{shlex.quote(str(recorder))}]"])
        adapter = adapter_for(cfg)
        if not adapter.starts_process:  # it only connects: there is no step to run
            assert adapter.tasks_per_node(cfg) == 0 and adapter.node_argv(cfg, 0, Rendezvous(1, "h", 2)) == []
            return
        if (adapter.max_nodes or 99) < cfg.layout.nodes:  # one node only: run its one-node layout instead
            cfg = compose(required(engine, path=hostile, checkpoint=hostile) +
                          ["model=llama2_70b_steerlm_chat", f"engine.command=[{shlex.quote(str(recorder))}]"])
        rv = Rendezvous(port=4321, master_addr="head-node", master_port=29555)
        step = adapter.step_command(cfg, rv)
        for node in range(cfg.layout.nodes):
            subprocess.run(step, env={"SLURM_NODEID": str(node), "PATH": "/usr/bin:/bin"}, check=True, timeout=60)
        recorded = [json.loads(line) for line in record.read_text().splitlines()]
        expected = [adapter.node_argv(cfg, node, rv)[1:] for node in range(cfg.layout.nodes)]
        assert recorded == expected
        assert not marker.exists()
        joined = [" ".join(r) for r in recorded]
        assert all("4321" in j for j in joined)
        if cfg.layout.nodes > 1 and not adapter.per_gpu_tasks:
            assert all("head-node" in j and "29555" in j for j in joined)  # every node finds the rendezvous
            assert recorded[0] != recorded[1]  # node ranks differ


def test_node_env_gives_each_node_its_own_value(tmp_path):
    """engine.node_env: what must differ per node (vLLM's CPU binding, a node-local cache) reaches each node."""
    record = tmp_path / "env.jsonl"
    recorder = tmp_path / "engine-program"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(record)!r}, 'a')"
                        ".write(json.dumps([os.environ.get('BIND'), sys.argv[1:]]) + '\\n')\n")
    recorder.chmod(0o755)
    cfg = compose(required("vllm") + ["model=nemotron4_340b_instruct", f"engine.command=[{recorder}]",
                                      "+engine.node_env.BIND=['0','1']"])
    adapter = check_engine(cfg)
    step = adapter.step_command(cfg, Rendezvous(port=1, master_addr="h", master_port=2))
    for node in (0, 1):
        subprocess.run(step, env={"SLURM_NODEID": str(node), "PATH": "/usr/bin:/bin"}, check=True, timeout=60)
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert [b for b, _ in seen] == ["0", "1"] and "--headless" in seen[1][1] and "--headless" not in seen[0][1]
    bad = compose(required("vllm") + ["model=nemotron4_340b_instruct", "+engine.node_env.BIND=['0']"])
    assert any("engine.node_env.BIND has 1 value(s); give one per node" in p for p in adapter.problems(bad))
