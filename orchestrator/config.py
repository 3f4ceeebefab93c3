"""Structured configs (dataclasses) for every group, registered in Hydra's ConfigStore.

`conf/config.yaml` composes them with the YAML groups `model=`, `engine=` and `cluster=`.
`to_config()` turns a composed DictConfig into validated dataclasses. A closed choice is typed
`Annotated[str, Literal[...]]` (OmegaConf 2.3 refuses a bare `Literal` field type) and checked in one place,
`_check_literals`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, get_args, get_origin

from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError
from .judge import DEFAULT_PATTERN as SCORE_PATTERN

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def bundled(name: str) -> Path:
    """A top-level folder of the project (conf, examples, slurm_templates): from the source tree when
    running from one (editable install), else the copy installed inside the package."""
    source = PROJECT_ROOT / name
    return source if (PROJECT_ROOT / "pyproject.toml").is_file() and source.is_dir() else PACKAGE_DIR / name


CONF_DIR = bundled("conf")
EXAMPLE_INPUT = bundled("examples") / "mt_bench_prompts.parquet"

# chat_template: the prompt goes to the engine's chat API, which applies the tokenizer's own template
PromptFormat = Annotated[str, Literal["nemotron4_chat", "steerlm", "nemotron_mini", "raw", "chat_template"]]
# orchestrator.protocols: one module each
ProtocolName = Annotated[str, Literal["nemo", "openai", "triton", "reward", "pooling"]]
OpenAIApi = Annotated[str, Literal["completions", "chat"]]
# whose OpenAI-compatible server (protocols.openai.openai_dialect): their request and answer fields differ
OpenAIDialect = Annotated[str, Literal["vllm", "sglang", "trtllm"]]
DuplicatePolicy = Annotated[str, Literal["error", "positional", "keep"]]
Dtype = Annotated[str, Literal["bf16", "fp16", "fp8", "fp32"]]
OnInterrupt = Annotated[str, Literal["cancel", "leave"]]
OutputFormat = Annotated[str, Literal["parquet", "jsonl", "openai_batch"]]  # orchestrator.sinks.SINKS: a file per unit
ParseMode = Annotated[str, Literal["struct", "columns"]]  # a structured answer: one `parsed` column, or its properties
InputFormat = Annotated[str, Literal["auto", "parquet", "jsonl", "openai_batch"]]  # data.format (orchestrator.inputs)


def literal_choices(kind: Any) -> tuple[str, ...]:
    """The choices of a closed-choice type (`Annotated[str, Literal[...]]`, optionally Optional); () for others."""
    if get_origin(kind) is typing.Union:
        return next((found for arg in get_args(kind) if (found := literal_choices(arg))), ())
    if get_origin(kind) is Annotated:
        return next((get_args(meta) for meta in kind.__metadata__ if get_origin(meta) is Literal), ())
    return ()


PROMPT_FORMATS = literal_choices(PromptFormat)
PROTOCOLS = literal_choices(ProtocolName)
OPENAI_APIS = literal_choices(OpenAIApi)
DUPLICATE_POLICIES = literal_choices(DuplicatePolicy)
OUTPUT_FORMATS = literal_choices(OutputFormat)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}  # the keys are Dtype's choices (tests/test_config.py)
MAX_ROLLOUTS = 1024  # a row's seeds are base .. base + rollouts - 1, all below 2**31
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs, and OpenAI's top_logprobs limit


def choices(group: str) -> tuple[str, ...]:
    """The options of a config group (`engine`, `cluster`, `model`): one YAML each in conf/<group>/."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_literals(obj: Any, prefix: str) -> None:
    """Every closed-choice field of a config dataclass holds one of its choices (None passes: unset)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        options, value = literal_choices(hints[f.name]), getattr(obj, f.name)
        if options and value is not None:
            _check_choice(f"{prefix}.{f.name}", value, options)


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise ConfigError(f"{key}={value!r} is out of range; it must be {' and '.join(s for s in (lo_s, hi_s) if s)}")


def _check_one_line(key: str, value: Any) -> None:
    """A value that becomes one line of a job script (#SBATCH, srun, pyxis) must stay one line: a newline or
    another control character would end that line and start a new one, which sbatch reads as a command."""
    if value is None:
        return
    text = str(value)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{key}={text!r} holds a control character ({bad!r}); it becomes one line of the job "
                          f"script, so it must be one line of printable text: remove the line break")


@dataclass
class ArchitectureConfig:
    num_layers: int = MISSING  # MISSING values are read from model.path/config.json when it is set
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None  # None = multi-head attention (one KV head per query head)
    vocab_size: int = MISSING
    max_seq_len: int = 4096
    gated_mlp: bool = False  # SwiGLU (3 matrices) vs squared-ReLU/GeLU (2 matrices)
    tied_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class PromptConfig:
    format: PromptFormat = "raw"
    system: str = ""  # system turn for chat formats
    steerlm_attributes: str = ""  # SteerLM attribute line, without the <extra_id_2> tag
    strip_echo: bool = True  # drop the echoed prompt from the engine's output (NeMo echoes it)
    # [opening, closing] tags of a reasoning model's thinking (e.g. ['<think>', '</think>']): the text before the
    # closing one goes to the `reasoning` column, the rest is the answer; null: no split (an engine that sends
    # its reasoning apart, vLLM's `reasoning` field, fills that column anyway)
    reasoning_tags: Optional[List[str]] = None

    def __post_init__(self) -> None:
        _check_literals(self, "model.prompt")
        if self.reasoning_tags is not None and (len(self.reasoning_tags) != 2 or not all(self.reasoning_tags)):
            raise ConfigError(f"model.prompt.reasoning_tags={list(self.reasoning_tags)}: give the opening and the "
                              f"closing tag, e.g. model.prompt.reasoning_tags=['<think>','</think>']")


@dataclass
class ModelConfig:
    name: str = MISSING
    card: str = ""  # the model card's name
    path: Optional[str] = None  # a Hugging Face checkpoint directory (vllm, sglang, trtllm load it)
    dtype: Dtype = "bf16"
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    end_strings: List[str] = field(default_factory=lambda: ["<|endoftext|>"])
    # a reward model's outputs, in order (one float result column each); non-empty: this model scores
    # answers (engine=nemo_reward, or engine.protocol=reward) instead of generating
    attributes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_literals(self, "model")
        if len(set(self.attributes)) != len(self.attributes) or not all(self.attributes):
            raise ConfigError(f"model.attributes={list(self.attributes)}: name each of the reward model's outputs "
                              f"once, in order, e.g. model.attributes=[helpfulness,correctness]")


@dataclass
class LayoutConfig:
    nodes: int = 1  # nodes per replica
    gpus_per_node: int = 8
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # D engine instances of TP x PP GPUs each per replica (nodes x gpus_per_node = TP x PP x D): vLLM and SGLang
    # serve them from one server (their own data-parallel flag), the other engines as D pinned servers
    # (orchestrator/instances.py); None = as many as fill the replica's GPUs (1 when TP x PP does not divide them);
    # docs/configuration.md "Data parallel"
    data_parallel: Optional[int] = None
    gpu: str = "h100_80gb"
    max_batch_size: int = 128  # sequences resident at once, for the KV-cache estimate
    max_seq_len: Optional[int] = None  # context for the KV-cache estimate; None = the model's
    memory_headroom: float = 0.10  # fraction of GPU memory kept free for activations and the runtime

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node", "tensor_parallel", "pipeline_parallel", "data_parallel",
                    "max_batch_size"):
            if getattr(self, key) is not None:  # data_parallel None: filled in by to_config (fill_data_parallel)
                _check_range(f"layout.{key}", getattr(self, key), lo=1)
        _check_range("layout.memory_headroom", self.memory_headroom, lo=0, hi=0.9)


@dataclass
class SamplingConfig:
    tokens_to_generate: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    repetition_penalty: float = 1.0
    min_tokens_to_generate: int = 0
    add_BOS: bool = False
    seed: Optional[int] = None
    end_strings: Optional[List[str]] = None  # None = the model's end strings
    # several answers per input row (docs/conversations.md "Several answers per prompt"): rollout k of a row is sampled
    # with its own seed, rollout_seed(seed, id) + k
    rollouts: int = 1
    # OpenAI engines: a row's rollouts in one request with `n` (vLLM serves choice i with seed + i, so
    # the answers are those of separate requests); false: one request per rollout. None: the engine's own
    # (true for vllm and mock, false for others, whose n may not follow that rule)
    rollouts_in_one_request: Optional[bool] = None
    # K: keep each answer's token logprobs and, per token, the K most likely alternatives (results get
    # token_logprobs and top_logprobs); None: none. OpenAI engines only (vLLM serves up to 20 by default)
    logprobs: Optional[int] = None
    # a JSON schema every answer must match (docs/output.md "Structured answers"): the path of a .json file, or
    # inline (a mapping, or JSON text); read and checked here, so config.yaml and the fingerprint hold the schema
    json_schema: Optional[Any] = None

    def __post_init__(self) -> None:
        _check_range("sampling.tokens_to_generate", self.tokens_to_generate, lo=1)
        from .structured import load_schema

        self.json_schema = load_schema(self.json_schema, "sampling.json_schema")
        if self.logprobs is not None:
            _check_range("sampling.logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        _check_range("sampling.rollouts", self.rollouts, lo=1, hi=MAX_ROLLOUTS)
        _check_range("sampling.temperature", self.temperature, lo=0, hi=100, lo_open=True)
        _check_range("sampling.top_p", self.top_p, lo=0, hi=1)
        _check_range("sampling.top_k", self.top_k, lo=0)
        _check_range("sampling.repetition_penalty", self.repetition_penalty, lo=1.0)
        _check_range("sampling.min_tokens_to_generate", self.min_tokens_to_generate, lo=0)


@dataclass
class SimulatorConfig:
    """The embedded engine's knobs (engine=mock, orchestrator.simulator): latency, capacity, injected faults.
    capacity is also every OpenAI and Triton engine's default for client.max_in_flight: see default_capacity."""

    request_latency_s: float = 0.0
    token_latency_s: float = 0.0
    capacity: int = 256
    error_rate: float = 0.0
    seed: int = 0
    max_natural_tokens: int = 512
    fail_rank: int = -1  # this engine rank exits at once (tests of a rank dying before readiness)
    stall_rate: float = 0.0  # fraction of requests that hang for stall_s (injected timeouts)
    stall_s: float = 30.0
    slow_replicas: List[int] = field(default_factory=list)  # these replicas' engines are slow_factor times slower
    slow_factor: float = 3.0
    require_key_env: Optional[str] = None  # the embedded engine requires Authorization: Bearer <this variable's value>
    # fraction of structured answers (sampling.json_schema) that break their schema (tests of client.invalid_retries)
    invalid_json_rate: float = 0.0

    def __post_init__(self) -> None:
        _check_range("engine.simulator.capacity", self.capacity, lo=1)
        _check_range("engine.simulator.error_rate", self.error_rate, lo=0, hi=1)
        _check_range("engine.simulator.invalid_json_rate", self.invalid_json_rate, lo=0, hi=1)
        _check_range("engine.simulator.request_latency_s", self.request_latency_s, lo=0)
        _check_range("engine.simulator.token_latency_s", self.token_latency_s, lo=0)


# The simulator's knobs were engine.<knob> until they moved to engine.simulator.<knob>: an old key is refused
# with its new name (overrides, YAML, dictionaries), not with Hydra's "Could not override".
MOVED_KEYS = {f"engine.{f.name}": f"engine.simulator.{f.name}" for f in fields(SimulatorConfig)}


def _moved_key(key: str, value: str | None = None) -> ConfigError:
    new = MOVED_KEYS[key]
    fix = new if value is None else f"{new}={value}"
    return ConfigError(f"{key} is now {new} (the embedded engine's knobs moved under engine.simulator); "
                       f"write {fix}")


def check_moved_overrides(overrides: list[str]) -> None:
    """Refuse a command-line override of a moved key (``engine.capacity=4``, ``+engine.capacity=4``) with
    a ConfigError naming its new key, before Hydra composes the config."""
    for override in overrides:
        key, eq, value = override.lstrip("+~").partition("=")
        if key in MOVED_KEYS:
            raise _moved_key(key, value if eq else None)


def default_capacity(cfg: Config) -> int:
    """Sequences an engine works on at once, for client.max_in_flight's default (2 x this for OpenAI and
    Triton's generate): engine.simulator.capacity, whose default (256) stands for every engine."""
    return cfg.engine.simulator.capacity


@dataclass
class EngineConfig:
    name: str = "mock"  # one of conf/engine/*.yaml; each has one adapter in orchestrator/engines/
    # nemo, openai, triton, reward or pooling; None = the engine's own (endpoint: found from its routes)
    protocol: Optional[ProtocolName] = None
    # OpenAI route: completions or chat; None = chat for model.prompt.format=chat_template
    api: Optional[OpenAIApi] = None
    # whose OpenAI server (engine=endpoint, engine=mock): vllm, sglang or trtllm; None = vllm, or the engine's own
    dialect: Optional[OpenAIDialect] = None
    host: str = "127.0.0.1"  # the address the engine's HTTP server binds
    url: Optional[str] = None  # engine=endpoint: the running server (http://host:port, a /v1 suffix is fine)
    port: int = 0  # 0 = a free port chosen on the node
    ready_timeout_s: float = 300.0  # deadline for the first one-token generation
    command: List[str] = field(default_factory=list)  # the engine's program, e.g. [vllm, serve]; [] = the adapter's
    extra_args: List[str] = field(default_factory=list)  # appended to every rank's command line
    env: Dict[str, str] = field(default_factory=dict)  # environment of the engine ranks
    node_env: Dict[str, List[str]] = field(default_factory=dict)  # per node: {NAME: [node 0's value, node 1's, ...]}
    master_addr: Optional[str] = None  # multi-node rendezvous host; None = node 0's hostname
    master_port: int = 0  # multi-node rendezvous port; 0 = a free port chosen on node 0
    served_model_name: Optional[str] = None  # the name the server answers to (Triton's model name); None = model.name
    skip_special_tokens: Optional[bool] = None  # OpenAI engines; None = false when end strings are set, so they match
    use_tokenizer: bool = True  # count prompt tokens with the engine's /tokenize where it has one
    options: Dict[str, Any] = field(default_factory=dict)  # adapter-specific settings, listed in its YAML
    # extra JSON fields of every request (e.g. vLLM's ignore_eos)
    extra_body: Dict[str, Any] = field(default_factory=dict)
    # servers behind authentication and TLS (docs/engines.md "Authenticated endpoints")
    api_key_env: Optional[str] = None  # the NAME of an environment variable holding the API key (never the key itself)
    verify_tls: bool = True  # https: check the server's certificate
    # https: PEM file of the CA that signed the server's certificate; None = the system's
    ca_bundle: Optional[str] = None
    # embedded (mock) engine knobs
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    # NeMo checkpoints (engine=nemo, engine=triton)
    checkpoint: Optional[str] = None  # the .nemo file, inside the container
    script: Optional[str] = None  # the NeMo script that serves it; None = the adapter's
    precision: str = "bf16"

    def __post_init__(self) -> None:
        _check_choice("engine.name", self.name, choices("engine"))
        _check_literals(self, "engine")
        _check_range("engine.ready_timeout_s", self.ready_timeout_s, lo=0, lo_open=True)
        _check_range("engine.port", self.port, lo=0, hi=65535)
        _check_range("engine.master_port", self.master_port, lo=0, hi=65535)


@dataclass
class ClusterConfig:
    name: str = "local"  # one of CLUSTERS
    timeout_min: int = 60 * 24  # wall-clock limit of one job
    # Slurm (cluster=slurm); every value reaches scripts shell-quoted
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    cpus_per_task: Optional[int] = None  # CPUs of the orchestrator's task on each node
    mem: Optional[str] = None  # per node, e.g. "0" (all) or "200G"
    job_name: str = "orchestrator"
    container_image: Optional[str] = None  # pyxis --container-image for the engine ranks
    container_mounts: List[str] = field(default_factory=list)  # pyxis --container-mounts, "src:dst" each
    container_workdir: Optional[str] = None  # pyxis --container-workdir
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load ...), verbatim
    sbatch_args: Dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options, {name: value}
    srun_args: List[str] = field(default_factory=list)  # extra arguments of the engine's srun step
    # Ctrl-C/SIGTERM/SIGHUP of a waiting front-end: cancel its jobs, or leave them running
    on_interrupt: OnInterrupt = "cancel"
    max_requeues: int = 3  # times a job requeues itself at its time limit (submitit checkpointing)
    signal_delay_s: int = 90  # Slurm's warning signal (USR2) comes this long before the time limit
    poll_interval_s: float = 2.0  # how often job states are read while waiting
    unknown_state_timeout_s: float = 300.0  # give up waiting on a job whose state cannot be read for this long
    # cluster=allocation: the share of the user's own job this run uses (a pipeline splits its nodes this way)
    nodes: Optional[int] = None  # how many of the allocation's nodes; None = all (or as many as nodelist names)
    nodelist: List[str] = field(default_factory=list)  # exactly these of its hostnames; []: its first `nodes`
    # the price of one GPU for one hour (any currency, a plain number): summary.json, status and the report turn
    # the run's GPU-hours into a cost with it; None: no cost. It changes no answer, so it is not in the fingerprint
    gpu_hour_cost: Optional[float] = None

    def __post_init__(self) -> None:
        _check_choice("cluster.name", self.name, choices("cluster"))
        if self.gpu_hour_cost is not None and not 0 <= self.gpu_hour_cost < float("inf"):
            raise ConfigError(f"cluster.gpu_hour_cost={self.gpu_hour_cost!r} is not a price: give what one GPU costs "
                              f"for one hour as a number >= 0 in any currency (e.g. cluster.gpu_hour_cost=2.5), "
                              f"or null for no cost")
        _check_literals(self, "cluster")
        _check_range("cluster.timeout_min", self.timeout_min, lo=1)
        if self.cpus_per_task is not None:
            _check_range("cluster.cpus_per_task", self.cpus_per_task, lo=1)
        if self.nodes is not None:
            _check_range("cluster.nodes", self.nodes, lo=1)
        if (self.nodes is not None or self.nodelist) and self.name != "allocation":
            key = "cluster.nodes" if self.nodes is not None else "cluster.nodelist"
            raise ConfigError(f"{key} is the share of your own Slurm job that cluster=allocation uses; with "
                              f"cluster={self.name} it means nothing: drop it (a replica's nodes are layout.nodes, "
                              f"their number replicas=N), or run inside an sbatch job with cluster=allocation")
        if self.nodelist:
            if len(set(self.nodelist)) != len(self.nodelist):
                raise ConfigError(f"cluster.nodelist={list(self.nodelist)} names a node twice; name each node once")
            if self.nodes is not None and self.nodes != len(self.nodelist):
                raise ConfigError(f"cluster.nodes={self.nodes} but cluster.nodelist names {len(self.nodelist)} "
                                  f"node(s) ({', '.join(self.nodelist)}); drop one of them, or make them agree")
        for name in ("partition", "account", "qos", "constraint", "mem", "job_name", "container_image",
                     "container_workdir"):
            _check_one_line(f"cluster.{name}", getattr(self, name))
        for name in ("container_mounts", "srun_args", "nodelist"):
            for i, value in enumerate(getattr(self, name) or []):
                _check_one_line(f"cluster.{name}[{i}]", value)
        for name, value in (self.sbatch_args or {}).items():
            _check_one_line(f"cluster.sbatch_args (the name {name!r})", name)
            _check_one_line(f"cluster.sbatch_args.{name}", value)


@dataclass
class SamplingColumns:
    """data.sampling_columns: the input column of each per-row sampling field (None: the config's for all rows).
    Iterating gives the (field, column) pairs that are set; unknown fields are refused as unknown keys."""

    max_tokens: Optional[str] = None
    temperature: Optional[str] = None
    top_p: Optional[str] = None
    seed: Optional[str] = None

    def items(self) -> list[tuple[str, str]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)]

    def __bool__(self) -> bool:
        return bool(self.items())


@dataclass
class DataConfig:
    input: Optional[str] = None  # Parquet or JSONL file, directory or glob; None = the bundled MT-Bench prompts
    # auto: by the files' suffix (.parquet, .jsonl), a JSONL file whose first line has custom_id and body being an
    # OpenAI Batch API file; or say which (docs/input.md)
    format: InputFormat = "auto"
    prompt_column: str = "prompt"
    id_column: str = "id"  # when absent from the input, ids are "<file>:<row>"
    unit_rows: int = 2048  # rows per unit of work (one result file each)
    read_batch_rows: int = 1024  # rows per Parquet record batch
    # error: refuse to start; positional: ids become "<file>:<row>"; keep: run every row
    duplicate_ids: DuplicatePolicy = "error"
    truncate_prompts: bool = False  # cut prompts longer than the context (keep the start) instead of a row error
    bytes_per_token: float = 4.0  # for the context check without a tokenizer: UTF-8 bytes per token
    # conversations (docs/conversations.md "Conversations and multi-turn"); either replaces prompt_column
    messages_column: Optional[str] = None  # a list of {role, content} per row: the conversation so far
    turns_column: Optional[str] = None  # a list of user turns per row: each is sent with the model's earlier answers
    attributes_column: Optional[str] = None  # SteerLM attribute line per row; None = model.prompt.steerlm_attributes
    keep_columns: List[str] = field(default_factory=list)  # input columns copied into the results
    # a scoring run (model.attributes): the answer each row's prompt is scored with (text, one per row)
    response_column: str = "response"
    # each row's prompt from any input columns: a sandboxed Jinja2 template (docs/configuration.md "Prompt
    # templates"), e.g. 'Question: {{ question }}'; replaces prompt_column
    prompt_template: Optional[str] = None
    system_column: Optional[str] = None  # each row's system prompt (text); None = model.prompt.system
    schema_column: Optional[str] = None  # each row's JSON schema (JSON text; null: sampling.json_schema's)
    # each row's own sampling from its columns: {max_tokens: COL, temperature: COL, top_p: COL, seed: COL} (any of
    # them); a null value is the config's. The columns are kept in the results
    sampling_columns: SamplingColumns = field(default_factory=lambda: SamplingColumns())
    # another run's directory: read its results as they commit (docs/pipelines.md "Streaming"), one unit of
    # this run per unit of that one; replaces data.input
    follow: Optional[str] = None
    # the share of that run's units committed before this run submits its jobs (0: its first unit)
    follow_after: float = 0.0

    def __post_init__(self) -> None:
        _check_range("data.unit_rows", self.unit_rows, lo=1)
        _check_range("data.follow_after", self.follow_after, lo=0, hi=1)
        if self.follow is not None and self.input is not None:
            raise ConfigError(f"data.follow={self.follow!r} reads that run's results as they commit, and "
                              f"data.input={self.input!r} names other input: set one of them")
        _check_range("data.read_batch_rows", self.read_batch_rows, lo=1)
        _check_literals(self, "data")
        _check_range("data.bytes_per_token", self.bytes_per_token, lo=0, lo_open=True)
        from .templates import check_keys  # data.prompt_template and data.system_column

        check_keys(self)


@dataclass
class ClientConfig:
    max_in_flight: Optional[int] = None  # in flight; None = 2 for nemo, 2 x engine.simulator.capacity for openai
    batch_size: int = 128  # prompts per NeMo request (the server's limit is 128)
    max_retries: int = 4  # retries of a transient failure before the rows are recorded as errors
    retry_backoff_s: float = 1.0  # first backoff; doubles each retry, with jitter
    retry_backoff_max_s: float = 30.0
    request_timeout_s: Optional[float] = None  # None = the engine's worst case: see request_timeout()
    max_s_per_token: float = 0.25  # the slowest generation step a healthy engine takes, for that worst case
    # no answer at all this long while requests wait: the engine is hung; None = the request timeout
    hung_after_s: Optional[float] = None
    progress_interval_s: float = 1.0  # how often progress is written for the terminal
    max_error_fraction: float = 0.5  # stop early when more than this share of rows failed...
    min_rows_for_error_check: int = 200  # ...once at least this many rows have an outcome
    grace_s: float = 30.0  # on preemption: time for in-flight requests to finish before they are abandoned
    lease_s: float = 120.0  # a replica silent this long has lost its claims: others take its units
    # once no unit is free, idle replicas run up to this many backup copies of each unit still held (0: none)
    backups: int = 1
    # fsync each unit's journal this often: what a node crash may lose of its answered rows (0: never)
    journal_sync_s: float = 5.0
    # a structured answer that does not match its schema is asked again (a new seed each time) this many times
    invalid_retries: int = 2
    # scrape the engine's Prometheus /metrics this often into work/metrics/<replica>.jsonl (0: never)
    metrics_interval_s: float = 5.0

    def __post_init__(self) -> None:
        _check_range("client.batch_size", self.batch_size, lo=1, hi=128)
        _check_range("client.invalid_retries", self.invalid_retries, lo=0)
        _check_range("client.max_retries", self.max_retries, lo=0)
        _check_range("client.max_error_fraction", self.max_error_fraction, lo=0, hi=1)
        _check_range("client.lease_s", self.lease_s, lo=0, lo_open=True)
        _check_range("client.backups", self.backups, lo=0)
        if self.request_timeout_s is not None:
            _check_range("client.request_timeout_s", self.request_timeout_s, lo=0, lo_open=True)  # 0 is not "never"
        _check_range("client.max_s_per_token", self.max_s_per_token, lo=0, lo_open=True)
        if self.hung_after_s is not None:
            _check_range("client.hung_after_s", self.hung_after_s, lo=0, lo_open=True)
        for key in ("retry_backoff_s", "retry_backoff_max_s", "grace_s", "journal_sync_s", "metrics_interval_s"):
            _check_range(f"client.{key}", getattr(self, key), lo=0)
        _check_range("client.progress_interval_s", self.progress_interval_s, lo=0, lo_open=True)
        _check_range("client.min_rows_for_error_check", self.min_rows_for_error_check, lo=0)
        if self.max_in_flight is not None:
            _check_range("client.max_in_flight", self.max_in_flight, lo=1)


@dataclass
class OutputConfig:
    # results/part-<unit>.parquet; jsonl: one JSON object per row; openai_batch: the OpenAI Batch API's output lines
    # (results/part-<unit>.batch.jsonl, and output.jsonl + errors.jsonl when the run completes; docs/output.md)
    format: OutputFormat = "parquet"
    # structured answers: struct = one column `parsed` typed from the schema; columns = its top-level properties
    parse: ParseMode = "struct"
    # LLM-as-judge (orchestrator.judge): each answer's score as this float column (null: none), read with
    # score_pattern's one group (MT-Bench's "Rating: [[5]]"), or, with a JSON schema, from the answer's property of
    # this name; a score outside score_range ([lo, hi]) or none at all: asked again, then UnparsedScore
    score_column: Optional[str] = None
    score_pattern: str = SCORE_PATTERN
    score_range: Optional[List[float]] = None

    def __post_init__(self) -> None:
        _check_literals(self, "output")
        from .judge import check_output  # output.score_* (a pattern with one group, [lo, hi])

        check_output(self)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    replicas: int = 1
    run_dir: str = MISSING
    wait: bool = True  # block with progress until the run ends; false: print job ids and return
    retry_failed: bool = False  # a rerun also redoes the rows recorded as errors (each once), keeping the ok rows

    def __post_init__(self) -> None:
        _check_range("replicas", self.replicas, lo=1)
        self._check_rollouts()
        from .structured import check_keys  # output.parse against the schema

        check_keys(self)  # and output.score_column against the run (judge.check_keys)
        if self.data.attributes_column and self.model.prompt.format != "steerlm":
            raise ConfigError(f"data.attributes_column={self.data.attributes_column!r} needs a SteerLM model, but "
                              f"model.prompt.format={self.model.prompt.format!r}; drop data.attributes_column or "
                              f"choose a SteerLM model (model=llama2_70b_steerlm_chat)")

    def _check_rollouts(self) -> None:
        """sampling.rollouts > 1: what cannot give N different answers per row is refused before submission."""
        n, s, data = self.sampling.rollouts, self.sampling, self.data
        if n <= 1:
            return
        conversation = [f"data.{k}={getattr(data, k)!r}" for k in ("messages_column", "turns_column")
                        if getattr(data, k)]
        if conversation:
            raise ConfigError(f"sampling.rollouts={n} cannot be combined with {' and '.join(conversation)}: several "
                              f"answers per row are for single prompts (data.prompt_column). Drop one of them, or "
                              f"repeat the rows in the input")
        if s.greedy or s.top_k == 1:
            why = "sampling.greedy=true" if s.greedy else "sampling.top_k=1"
            raise ConfigError(f"sampling.rollouts={n} asks for {n} sampled answers per row, but {why} picks the most "
                              f"likely token every time, so the {n} answers would be the same. Sample instead: "
                              f"sampling.greedy=false sampling.top_k=0 (and sampling.temperature, sampling.top_p)")

    @property
    def end_strings(self) -> list[str]:
        return list(self.sampling.end_strings if self.sampling.end_strings is not None else self.model.end_strings)

    @property
    def request_timeout_s(self) -> float:
        """client.request_timeout_s, or a healthy engine's worst case for one request: a start-up allowance
        plus the whole generation at the slowest step, twice over (it may wait behind one other batch)."""
        if self.client.request_timeout_s is not None:
            return self.client.request_timeout_s
        return 300.0 + 2 * self.sampling.tokens_to_generate * self.client.max_s_per_token

    @property
    def input_path(self) -> str:
        if self.data.follow is not None:  # the run followed: its results
            return str(Path(self.data.follow).expanduser() / "results")
        return self.data.input or str(EXAMPLE_INPUT)


def config_yaml(cfg: Config) -> str:
    """The fully resolved config, as written to config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="orchestrator_schema", node=Config)


def _check_unknown_keys(cfg: DictConfig | dict, schema: type, prefix: str = "") -> None:
    """A key the schema does not have is a typo (Hydra's own hint, `+key=`, adds it silently): refuse it
    and name the closest valid key. Free-form dictionaries (engine.env, engine.options, ...) take any key."""
    import dataclasses
    import difflib
    import typing

    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in (cfg.keys() if isinstance(cfg, (DictConfig, dict)) else []):
        if not prefix and key == "hydra":
            continue
        if key not in names:
            if f"{prefix}{key}" in MOVED_KEYS:
                raise _moved_key(f"{prefix}{key}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key} is not a config key; {hint}")
        kind = hints[key]
        value = cfg[key] if isinstance(cfg, dict) else cfg.get(key)
        if dataclasses.is_dataclass(kind) and isinstance(value, (DictConfig, dict)):
            _check_unknown_keys(value, kind, f"{prefix}{key}.")


def fill_data_parallel(layout) -> None:
    """layout.data_parallel left unset: the instances of TP x PP that fill the replica's GPUs (so a small model on
    an 8-GPU node runs 8 instances of one GPU), or 1 when TP x PP does not divide them (layout.problems says so)."""
    if layout.data_parallel is None:
        per, gpus = layout.tensor_parallel * layout.pipeline_parallel, layout.nodes * layout.gpus_per_node
        layout.data_parallel = gpus // per if per > 0 and gpus % per == 0 and gpus > per else 1


def to_config(cfg: DictConfig | dict) -> Config:
    """Validate a composed config into dataclasses; raises ConfigError with the key and the fix."""
    from omegaconf.errors import OmegaConfBaseException

    from .hf import fill_architecture

    _check_unknown_keys(cfg, Config)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        if "hydra" in merged:
            del merged["hydra"]
        fill_architecture(merged.model)
        fill_data_parallel(merged.layout)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def compose(overrides: list[str] | None = None) -> Config:
    """Compose `conf/` with overrides outside of a Hydra app (tests, library use)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_moved_overrides(list(overrides or []))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_config(cfg)
