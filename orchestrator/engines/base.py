"""The engine adapter: everything that differs between engines, in one class per engine.

An adapter says how many tasks per node its server needs, each node's argv, which protocol (codec)
its server speaks, and what must be true of the config before any GPU is asked for. Nothing else in
the project asks which engine it is. A new engine is one file in this folder (a subclass registered
as `ADAPTER`) plus one YAML in `conf/engine/`, and passes `tests/test_engine_contract.py`.
"""
from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass

from .. import instances
from ..config import Config, choices
from ..errors import ConfigError
from ..protocols import auth
from ..protocols.base import logprobs_problem
from ..protocols.openai import OPENAI_SERVERS
from ..protocols.pooling import route_problem

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}


@dataclass(frozen=True)
class Rendezvous:
    """What node 0 decides when a replica starts: the HTTP port and the multi-node rendezvous point."""

    port: int | str
    master_addr: str
    master_port: int | str
    port_file: str | None = None  # where an engine that picks its own port writes it (the embedded engine)
    rank_dir: str | None = None  # where the embedded engine's ranks record their placement
    replica: int = 0  # which replica of the run this engine serves


class EngineAdapter:
    name = ""
    protocol = "openai"  # what its server speaks: a codec in orchestrator/protocols
    per_gpu_tasks = False  # True: one task per GPU (NeMo, TRT-LLM); False: one per node (vLLM, SGLang)
    default_command: tuple[str, ...] = ()
    max_nodes: int | None = None  # None: any number of nodes per replica
    needs_hf_checkpoint = False  # loads model.path (a Hugging Face directory)
    needs_nemo_checkpoint = False  # loads engine.checkpoint (a .nemo file)
    starts_process = True  # False: an engine that is already running (endpoint)
    simulated = False  # True: the embedded engine, which runs its multi-node shape on one machine too
    reports_port = False  # True: it binds a free port itself and writes it to the port file (embedded engine)
    binds_all_interfaces = False  # its server ignores engine.host and listens on 0.0.0.0
    step_args: tuple[str, ...] = ()  # extra arguments of the engine's srun step (e.g. --mpi=pmix)
    # its OpenAI server answers `n` as vLLM does (choice i sampled with seed + i, token ids on request), so a
    # row's rollouts may go in one request (sampling.rollouts_in_one_request's default)
    honours_n = False
    # it serves layout.data_parallel > 1 itself: D engine instances behind one server (its own flag, in node_argv);
    # False: D servers per replica, each pinned to its own GPUs (orchestrator/instances.py)
    native_data_parallel = False

    def protocol_for(self, cfg: Config) -> str | None:
        """The protocol the client speaks to it; None: found from the server's routes at readiness."""
        return self.protocol

    def tasks_per_node(self, cfg: Config) -> int:
        return cfg.layout.gpus_per_node if self.per_gpu_tasks else 1

    def command(self, cfg: Config) -> list[str]:
        return list(cfg.engine.command or self.default_command)

    def node_argv(self, cfg: Config, node: int, rv: Rendezvous) -> list[str]:
        """The command line every task of replica node `node` runs."""
        raise NotImplementedError

    def env(self, cfg: Config) -> dict[str, str]:
        """Environment of every engine rank (on top of the job's)."""
        return {str(k): str(v) for k, v in cfg.engine.env.items()}

    def instance_env(self, rv: Rendezvous) -> dict[str, str]:
        """Environment of one pinned instance's ranks (instances.py) beside others on its node: what keeps
        their rendezvous apart."""
        return {}

    def answer_settings(self, cfg: Config) -> dict:
        """Settings of this engine, beyond the common ones, that decide its answers (for the resume check)."""
        return {}

    def node_env_prefix(self, cfg: Config, node: int) -> list[str]:
        """`env NAME=VALUE ...` for what differs per node (engine.node_env), e.g. each node's CPU binding."""
        pairs = [f"{name}={values[node]}" for name, values in sorted(cfg.engine.node_env.items())]
        return ["env", *pairs] if pairs else []

    def problems(self, cfg: Config) -> list[str]:
        """What is wrong with the config for this engine, each with the fix; checked before submission."""
        found = []
        for name, values in cfg.engine.node_env.items():
            if len(values) != cfg.layout.nodes:
                found.append(f"engine.node_env.{name} has {len(values)} value(s); give one per node "
                             f"(layout.nodes={cfg.layout.nodes})")
        if cfg.engine.url and self.starts_process:
            found.append(f"engine.url is for an engine that is already running: use engine=endpoint "
                         f"engine.url={cfg.engine.url} (engine={self.name} starts its own server)")
        if self.max_nodes is not None and cfg.layout.nodes > self.max_nodes:
            found.append(f"engine={self.name} runs on at most {self.max_nodes} node(s) per replica; "
                         f"layout.nodes={cfg.layout.nodes}: use a layout on one node, or another engine")
        if self.needs_hf_checkpoint and not cfg.model.path:
            found.append(f"engine={self.name} loads a Hugging Face checkpoint: set model.path=/path/to/checkpoint "
                         f"(for {cfg.model.name}, the -hf conversion of its weights)")
        if self.needs_nemo_checkpoint and not cfg.engine.checkpoint:
            found.append(f"engine={self.name} needs engine.checkpoint=/path/to/model.nemo "
                         f"(as seen inside the container)")
        if cfg.engine.dialect and self.name in OPENAI_SERVERS and cfg.engine.dialect != self.name:
            found.append(f"engine.dialect={cfg.engine.dialect}: engine={self.name} is {self.name}'s own server; drop "
                         f"engine.dialect (it names the server behind engine=endpoint, or the embedded engine's)")
        if cfg.layout.data_parallel > 1 and not self.starts_process:
            found.append(f"layout.data_parallel={cfg.layout.data_parallel}: engine={self.name} talks to a server that "
                         f"is already running and starts no instance to pin to GPUs; drop layout.data_parallel "
                         f"(several running servers: one run each, or engine=vllm or engine=sglang started by the run)")
        found += instances.problems(cfg, self)  # D pinned servers per replica (instances.py)
        found += auth.problems(cfg)  # engine.api_key_env names a variable that is set; engine.ca_bundle exists
        protocol = self.protocol_for(cfg)
        found += scoring_problems(cfg, self.name, protocol)
        refused = logprobs_problem(cfg, self.name, protocol)
        if refused:
            found.append(refused)
        # (a scoring run sends SteerLM reward sentences whatever the prompt format: orchestrator.scoring)
        if cfg.model.prompt.format == "chat_template" and protocol not in ("openai", None) and not cfg.model.attributes:
            found.append(f"model.prompt.format=chat_template needs an engine with a chat API; engine={self.name} "
                         f"speaks {protocol}: set model.prompt.format to the model's card format")
        return found

    def step_command(self, cfg: Config, rv: Rendezvous) -> list[str]:
        """The argv the engine step runs on every task: the node's argv directly when all nodes run the
        same line, else a `bash -c` that picks the line by $SLURM_NODEID (every line shell-quoted)."""
        lines = [self.node_env_prefix(cfg, node) + self.node_argv(cfg, node, rv) for node in range(cfg.layout.nodes)]
        if all(line == lines[0] for line in lines):
            return lines[0]
        cases = "".join(f"  {node}) exec {shlex.join(line)} ;;\n" for node, line in enumerate(lines))
        script = (f'case "${{SLURM_NODEID:-0}}" in\n{cases}'
                  f'  *) echo "engine step: unexpected SLURM_NODEID=$SLURM_NODEID" >&2; exit 2 ;;\nesac')
        return ["bash", "-c", script]

    def model_source(self, cfg: Config) -> str:
        return cfg.model.path or cfg.model.name

    def served_name(self, cfg: Config) -> str:
        return cfg.engine.served_model_name or cfg.model.name


def data_parallel_refusal(cfg: Config, engine: str, why: str) -> str:
    """layout.data_parallel > 1 where the engine's own data parallelism cannot serve this layout (why), with the
    fix: the same GPUs as more replicas."""
    layout = cfg.layout
    per = layout.tensor_parallel * layout.pipeline_parallel
    replicas = cfg.replicas * layout.data_parallel
    fix = (f"layout.nodes=1 layout.gpus_per_node={per} layout.data_parallel=1 replicas={replicas}"
           if per <= layout.gpus_per_node else
           f"layout.nodes={per // layout.gpus_per_node} layout.data_parallel=1 replicas={replicas}")
    return (f"layout.data_parallel={layout.data_parallel}: {why}; run the instances as replicas instead ({fix}: "
            f"one instance of TP x PP = {per} GPU(s) each)")


SCORING_PROTOCOLS = ("reward", "pooling")  # the protocols whose servers score (model.attributes) instead of generating


def scoring_problems(cfg: Config, engine: str, protocol: str | None) -> list[str]:
    """A scoring model (model.attributes) needs a scoring server (protocol reward: NeMo-Aligner's; pooling: vLLM's
    pooling runner), and a scoring server a scoring model; a reward model gives one score vector per answer."""
    attributes = list(cfg.model.attributes)
    if attributes and protocol not in (*SCORING_PROTOCOLS, None):
        return [f"model={cfg.model.name} is a reward model (model.attributes={attributes}): it scores answers, but "
                f"engine={engine} ({protocol}) only generates; use engine=nemo_reward (NeMo-Aligner's "
                f"serve_reward_model.py) or engine=vllm (vLLM's pooling runner, for a Hugging Face checkpoint with a "
                f"classification or reward head), or engine=endpoint engine.protocol=reward (or pooling) "
                f"engine.url=http://HOST:PORT for a scoring server that is running (the embedded engine scores with "
                f"engine=mock engine.protocol=reward or pooling)"]
    if not attributes and protocol in SCORING_PROTOCOLS:
        return [f"engine={engine} (protocol {protocol}) scores answers with a reward model, but model={cfg.model.name} "
                f"lists no model.attributes (it generates); use model=nemotron4_340b_reward or model=tiny_reward (or "
                f"set model.attributes=[...] to the reward model's outputs, in order), or a generation engine"]
    if protocol == "pooling":
        refused = route_problem(cfg)
        if refused:
            return [refused]
    if not attributes:
        return []
    found = []
    if cfg.sampling.rollouts > 1:
        found.append(f"sampling.rollouts={cfg.sampling.rollouts}: a reward model gives one score per answer; set "
                     f"sampling.rollouts=1 (score the rollouts of a generation run as rows of their own)")
    if cfg.sampling.json_schema is not None or cfg.data.schema_column:
        found.append("a reward model's answers are its scores, not text under a JSON schema: unset "
                     "sampling.json_schema and data.schema_column for a scoring run")
    if cfg.output.format == "openai_batch":
        found.append("output.format=openai_batch writes generated answers; a scoring run's results are score columns: "
                     "use output.format=parquet or output.format=jsonl")
    return found


def adapter_for(cfg: Config) -> EngineAdapter:
    """The adapter of cfg.engine.name: module orchestrator/engines/<name>.py, attribute ADAPTER."""
    name = cfg.engine.name
    try:
        module = importlib.import_module(f"{__package__}.{name}")
        adapter = module.ADAPTER
    except (ImportError, AttributeError):
        raise ConfigError(f"engine={name} has no adapter (orchestrator/engines/{name}.py with ADAPTER); "
                          f"choose one of: {', '.join(choices('engine'))}") from None
    return adapter


def rollouts_in_one_request(cfg: Config) -> bool:
    """sampling.rollouts_in_one_request, or the engine's default: vLLM (and the embedded engine, which
    copies it) answer `n` with seeds seed + i; for other engines that is not known, so one request a rollout.
    On NeMo only an explicit true counts: it sends a row's rollouts as copies of its prompt in one request
    (other answers than one request per rollout, so the resume check includes it: preflight.fingerprint).
    The codecs get the answer from their caller (protocols.make_codec's one_request): the engine's adapter knows."""
    chosen = cfg.sampling.rollouts_in_one_request
    if chosen is not None:
        return bool(chosen)
    return adapter_for(cfg).honours_n


def check_engine(cfg: Config) -> EngineAdapter:
    """The adapter, after its checks pass; raises ConfigError naming every problem and its fix."""
    adapter = adapter_for(cfg)
    found = adapter.problems(cfg)
    if found:
        raise ConfigError(f"engine={cfg.engine.name} cannot run this config:\n" + "\n".join(f"  - {p}" for p in found))
    return adapter
