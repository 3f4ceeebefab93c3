"""Pure layout checks: a config's model + layout -> a validated Layout, before any GPU is asked for."""
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

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.usable_gb

    def describe(self) -> str:
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {self.gpu.name} GPU(s), "
                f"TP={self.tensor_parallel} PP={self.pipeline_parallel}, replicas={self.replicas}")


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
    if tp * pp != layout.nodes * layout.gpus_per_node:
        found.append(f"TP x PP = {tp} x {pp} = {tp * pp} must equal nodes x GPUs per node = "
                     f"{layout.nodes} x {layout.gpus_per_node} = {layout.nodes * layout.gpus_per_node}")
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
    weights, kv = memory_per_gpu(model, layout)
    usable = gpu.memory_gb * (1 - layout.memory_headroom)
    if weights + kv > usable:
        found.append(f"weights {weights:.1f} GB + KV cache {kv:.1f} GB = {weights + kv:.1f} GB per GPU "
                     f"exceeds the {usable:.1f} GB usable on a {gpu.name} "
                     f"({layout.memory_headroom:.0%} kept free)")
    return found


def valid_layouts(model: ModelConfig, layout: LayoutConfig, max_nodes: int = 8, limit: int = 8) -> list[LayoutConfig]:
    """The smallest valid layouts for this model on this GPU type (same batch, context and headroom)."""
    gpu = GPUS.get(layout.gpu)
    if gpu is None:
        return []
    found = []
    for nodes in range(1, max_nodes + 1):
        for gpn in (1, 2, 4, 8):
            if gpn > gpu.max_per_node or (nodes > 1 and gpn < gpu.max_per_node):
                continue
            total = nodes * gpn
            for tp in (1, 2, 4, 8):
                if total % tp:
                    continue
                candidate = replace(layout, nodes=nodes, gpus_per_node=gpn, tensor_parallel=tp,
                                    pipeline_parallel=total // tp)
                if not problems(model, candidate):
                    found.append(candidate)
    found.sort(key=lambda c: (c.nodes * c.gpus_per_node, c.pipeline_parallel))
    return found[:limit]


def format_layout(c: LayoutConfig) -> str:
    return (f"layout.nodes={c.nodes} layout.gpus_per_node={c.gpus_per_node} "
            f"layout.tensor_parallel={c.tensor_parallel} layout.pipeline_parallel={c.pipeline_parallel}")


def build_layout(cfg: Config, check: bool = True) -> Layout:
    """Validate cfg's layout for its model; raises LayoutError listing what is wrong and what would work."""
    found = problems(cfg.model, cfg.layout)
    if found and check:
        lines = [f"layout for {cfg.model.name} is invalid: "
                 f"{cfg.layout.nodes} node(s) x {cfg.layout.gpus_per_node} {cfg.layout.gpu}, "
                 f"TP={cfg.layout.tensor_parallel} PP={cfg.layout.pipeline_parallel}"]
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
                  gpu.memory_gb * (1 - cfg.layout.memory_headroom))
