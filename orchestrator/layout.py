"""Pure layout checks: a config's model + layout -> a validated Layout, before any GPU is asked for.

A replica holds layout.data_parallel (D) engine instances of TP x PP GPUs each: nodes x gpus_per_node =
TP x PP x D. The memory estimate is per instance (each instance holds the whole model split TP x PP ways);
throughput_estimate compares the valid splits of the same GPUs (docs/configuration.md "Data parallel")."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import DTYPE_BYTES, ArchitectureConfig, Config, LayoutConfig, ModelConfig
from .errors import LayoutError

GB = 1e9


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gb: float
    max_per_node: int = 8


GPUS = {
    "h100_80gb": GpuType("h100_80gb", 80.0),
    "h200_141gb": GpuType("h200_141gb", 141.0),
    "a100_80gb": GpuType("a100_80gb", 80.0),
    "a100_40gb": GpuType("a100_40gb", 40.0),
}




@dataclass(frozen=True)
class Layout:
    """One replica's shape and its memory estimate, per GPU."""

    nodes: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    replicas: int
    gpu: GpuType
    weights_gb: float
    kv_cache_gb: float
    usable_gb: float
    data_parallel: int = 1  # engine instances per replica, TP x PP GPUs each

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def world_size(self) -> int:
        """GPUs of one engine instance (TP x PP)."""
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.usable_gb

    def describe(self) -> str:
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {self.gpu.name} GPU(s), "
                f"TP={self.tensor_parallel} PP={self.pipeline_parallel} DP={self.data_parallel}, "
                f"replicas={self.replicas}")


def parameter_count(arch: ArchitectureConfig) -> int:
    """Transformer weights: attention (Q, K, V, output), MLP, layer norms, embeddings (+ output layer)."""
    h = arch.hidden_size
    kv_dim = arch.kv_heads * arch.head_dim
    attention = h * (h + 2 * kv_dim) + h * h
    mlp = (3 if arch.gated_mlp else 2) * h * arch.ffn_hidden_size
    norms = 4 * h
    embeddings = arch.vocab_size * h * (1 if arch.tied_embeddings else 2)
    return arch.num_layers * (attention + mlp + norms) + embeddings + 2 * h


def memory_per_gpu(model: ModelConfig, layout: LayoutConfig) -> tuple[float, float]:
    """(weights, KV cache) in GB on one GPU for a TP x PP split, at the configured batch and context."""
    arch = model.architecture
    nbytes = DTYPE_BYTES[model.dtype]
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    weights = parameter_count(arch) * nbytes / (tp * pp)
    kv_heads_per_gpu = max(1, arch.kv_heads // tp)
    seq = layout.max_seq_len or arch.max_seq_len
    layers_per_stage = -(-arch.num_layers // pp)
    kv = 2 * layers_per_stage * kv_heads_per_gpu * arch.head_dim * nbytes * seq * layout.max_batch_size
    return weights / GB, kv / GB


def problems(model: ModelConfig, layout: LayoutConfig) -> list[str]:
    """Every rule the layout breaks, each as a sentence naming the numbers; empty when valid."""
    arch = model.architecture
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    found = []
    if layout.gpu not in GPUS:
        return [f"layout.gpu={layout.gpu!r} is unknown; choose one of: {', '.join(GPUS)}"]
    gpu = GPUS[layout.gpu]
    if layout.gpus_per_node > gpu.max_per_node:
        found.append(f"layout.gpus_per_node={layout.gpus_per_node} exceeds the {gpu.max_per_node} "
                     f"{gpu.name} GPUs a node has")
    weights, kv = memory_per_gpu(model, layout)
    usable = gpu.memory_gb * (1 - layout.memory_headroom)
    found += _gpu_count_problems(layout, instance_fits=weights + kv <= usable)
    if layout.gpus_per_node % tp and tp % layout.gpus_per_node:
        found.append(f"a tensor-parallel group of {tp} must fill whole nodes or divide a node's "
                     f"{layout.gpus_per_node} GPUs")
    elif tp > layout.gpus_per_node:
        found.append(f"TP={tp} would span nodes (only {layout.gpus_per_node} GPUs per node); keep "
                     f"tensor parallelism inside a node and use pipeline parallelism across nodes")
    if arch.num_attention_heads % tp:
        found.append(f"{arch.num_attention_heads} attention heads are not divisible by TP={tp}")
    if arch.kv_heads % tp:
        found.append(f"{arch.kv_heads} KV groups are not divisible by TP={tp}")
    if arch.num_layers % pp:
        found.append(f"{arch.num_layers} layers are not divisible by PP={pp}")
    if weights + kv > usable:
        found.append(f"weights {weights:.1f} GB + KV cache {kv:.1f} GB = {weights + kv:.1f} GB per GPU "
                     f"exceeds the {usable:.1f} GB usable on a {gpu.name} "
                     f"({layout.memory_headroom:.0%} kept free)")
    return found


def _gpu_count_problems(layout: LayoutConfig, instance_fits: bool) -> list[str]:
    """nodes x gpus_per_node = TP x PP x D, and D instances that each sit on whole nodes or inside one."""
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    gpus, per = layout.nodes * layout.gpus_per_node, tp * pp
    fits_whole = gpus % per == 0
    if per * dp != gpus:
        if dp == 1:
            hint = (f"; to run {gpus // per} instances of TP x PP on these GPUs, set layout.data_parallel={gpus // per}"
                    if fits_whole and gpus > per and instance_fits else "")
            return [f"TP x PP = {tp} x {pp} = {per} must equal nodes x GPUs per node = "
                    f"{layout.nodes} x {layout.gpus_per_node} = {gpus}{hint}"]
        fix = (f"set layout.data_parallel={gpus // per} (the {gpus} GPUs hold {gpus // per} instances of {per})"
               if fits_whole else f"instances of TP x PP = {per} GPUs do not divide the {gpus} GPUs; change "
                                  f"layout.tensor_parallel or layout.pipeline_parallel")
        return [f"TP x PP x D = {tp} x {pp} x {dp} = {per * dp} must equal nodes x GPUs per node = "
                f"{layout.nodes} x {layout.gpus_per_node} = {gpus}: {fix}"]
    gpn = layout.gpus_per_node
    if dp > 1 and gpn % per and per % gpn:
        return [f"layout.data_parallel={dp}: an instance of TP x PP = {per} GPUs neither divides a node's {gpn} GPUs "
                f"nor fills whole nodes, so one would straddle nodes; choose TP x PP dividing layout.gpus_per_node"]
    return []


def valid_layouts(model: ModelConfig, layout: LayoutConfig, max_nodes: int = 8, limit: int = 8) -> list[LayoutConfig]:
    """The smallest valid layouts for this model on this GPU type (same batch, context and headroom): fewest
    GPUs first, and of the same GPUs, one instance (D=1) before data parallel, then the shortest pipeline."""
    gpu = GPUS.get(layout.gpu)
    if gpu is None:
        return []
    found = []
    for nodes in range(1, max_nodes + 1):
        for gpn in (1, 2, 4, 8):
            if gpn > gpu.max_per_node or (nodes > 1 and gpn < gpu.max_per_node):
                continue
            found += splits(model, replace(layout, nodes=nodes, gpus_per_node=gpn))
    found.sort(key=lambda c: (c.nodes * c.gpus_per_node, c.data_parallel, c.pipeline_parallel))
    return found[:limit]


def splits(model: ModelConfig, layout: LayoutConfig) -> list[LayoutConfig]:
    """Every valid TP x PP x D of layout's nodes x gpus_per_node (TP a power of two up to 8)."""
    total = layout.nodes * layout.gpus_per_node
    found = []
    for tp in (1, 2, 4, 8):
        for dp in range(1, total // tp + 1):
            if total % (tp * dp):
                continue
            candidate = replace(layout, tensor_parallel=tp, pipeline_parallel=total // (tp * dp), data_parallel=dp)
            if not problems(model, candidate):
                found.append(candidate)
    return found


TP_COST = 0.10  # the throughput estimate's cost of each extra GPU in an instance (TP all-reduces, PP hand-offs)
MAX_SEQUENCES = 256  # the throughput estimate's cap on the sequences one instance runs at once (vLLM's max-num-seqs)


def throughput_estimate(model: ModelConfig, layout: LayoutConfig) -> float:
    """Estimated decode throughput per GPU, in sequences, for comparing the splits of the same GPUs (a ranking,
    not a forecast): the KV-cache room of an instance (the sequences at full context that fit in the memory its
    weights leave free, at most the engine's concurrency) x the D instances / the GPUs, with each extra GPU in an
    instance (TP or PP) costing TP_COST of its speed for the exchanges between them.

    The room grows as weights spread over more GPUs, but every GPU of an instance waits on the others at each
    step; a small model that fits one GPU serves most per GPU as D instances of one GPU each."""
    gpu = GPUS[layout.gpu]
    weights, kv = memory_per_gpu(model, layout)
    per_sequence = kv / layout.max_batch_size  # GB per GPU of one sequence at full context
    usable = gpu.memory_gb * (1 - layout.memory_headroom)
    room = min(MAX_SEQUENCES, max(0.0, usable - weights) / per_sequence)  # sequences one instance holds
    gpus = layout.nodes * layout.gpus_per_node
    exchanges = 1 + TP_COST * (layout.tensor_parallel * layout.pipeline_parallel - 1)
    return layout.data_parallel * room / (gpus * exchanges)


def format_layout(c: LayoutConfig) -> str:
    return (f"layout.nodes={c.nodes} layout.gpus_per_node={c.gpus_per_node} "
            f"layout.tensor_parallel={c.tensor_parallel} layout.pipeline_parallel={c.pipeline_parallel} "
            f"layout.data_parallel={c.data_parallel}")


def build_layout(cfg: Config, check: bool = True) -> Layout:
    """Validate cfg's layout for its model; raises LayoutError listing what is wrong and what would work."""
    found = problems(cfg.model, cfg.layout)
    if found and check:
        lines = [f"layout for {cfg.model.name} is invalid: "
                 f"{cfg.layout.nodes} node(s) x {cfg.layout.gpus_per_node} {cfg.layout.gpu}, "
                 f"TP={cfg.layout.tensor_parallel} PP={cfg.layout.pipeline_parallel} DP={cfg.layout.data_parallel}"]
        lines += [f"  - {p}" for p in found]
        options = valid_layouts(cfg.model, cfg.layout)
        if options:
            lines.append(f"valid layouts for {cfg.model.name} on {cfg.layout.gpu}:")
            lines += [f"  {format_layout(o)}" for o in options]
        else:
            lines.append(f"no layout of up to 8 nodes fits {cfg.model.name} on {cfg.layout.gpu}; "
                         f"try a larger GPU (layout.gpu=...), a smaller layout.max_batch_size or layout.max_seq_len")
        raise LayoutError("\n".join(lines))
    gpu = GPUS.get(cfg.layout.gpu, GpuType(cfg.layout.gpu, 0.0))
    weights, kv = memory_per_gpu(cfg.model, cfg.layout)
    return Layout(cfg.layout.nodes, cfg.layout.gpus_per_node, cfg.layout.tensor_parallel,
                  cfg.layout.pipeline_parallel, cfg.replicas, gpu, weights, kv,
                  gpu.memory_gb * (1 - cfg.layout.memory_headroom), cfg.layout.data_parallel)
