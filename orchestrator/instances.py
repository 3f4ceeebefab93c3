"""layout.data_parallel=D on an engine without data parallelism of its own (NeMo, TRT-LLM, Triton, the embedded
engine): D servers per replica, each pinned to its own GPUs, each with its own port and its own client.

An instance of TP x PP GPUs either sits inside one node (D / nodes instances on each node, GPUs
k x TP x PP .. (k + 1) x TP x PP - 1 of it, by CUDA_VISIBLE_DEVICES) or fills whole nodes (nodes / D each, all
their GPUs). Its engine step is the engine's own recipe for a replica of that shape (`instance_config`: one
instance's layout, D = 1), started on its own nodes (`Instance.first_node`). Each instance's client claims
units on its own (owner `r<replica>i<k>`), so an instance whose engine dies loses only its requests in flight:
what it answered is in its units' journals, and its claims go to the live instances once client.lease_s has
passed without its heartbeat (claims.py). vLLM and SGLang serve D themselves (their adapter's
native_data_parallel): one server, one client. engine=endpoint with several servers (engine.url=URL,URL,...)
runs the same way: one client per server.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import Config


@dataclass(frozen=True)
class Instance:
    index: int  # k, 0 .. D - 1
    first_node: int  # the replica's node (0-based) where its engine step starts
    nodes: int  # nodes it spans
    gpus: str  # CUDA_VISIBLE_DEVICES on each of its nodes; "" when it has all of them (whole nodes)
    per_node: int  # instances sharing each of its nodes (their steps divide the node's CPUs)
    url: str | None = None  # engine=endpoint with several engine.url: the server this one is


def endpoint_urls(cfg: Config) -> list[str]:
    """engine.url's servers: one, or several separated by commas (servers already running, one client each)."""
    return [url.strip() for url in (cfg.engine.url or "").split(",") if url.strip()]


def pinned(cfg: Config, adapter) -> bool:
    """Whether this replica runs one engine per instance (and a client each) rather than one."""
    if not adapter.starts_process:
        return len(endpoint_urls(cfg)) > 1
    return cfg.layout.data_parallel > 1 and not adapter.native_data_parallel


def instances(cfg: Config, adapter) -> list[Instance]:
    """The instances of one replica, in order (layout.problems has checked that they tile its GPUs)."""
    if not adapter.starts_process:
        return [Instance(k, 0, 1, "", 1, url) for k, url in enumerate(endpoint_urls(cfg))]
    layout = cfg.layout
    per, gpn, dp = layout.tensor_parallel * layout.pipeline_parallel, layout.gpus_per_node, layout.data_parallel
    if per >= gpn:  # whole nodes each
        span = per // gpn
        return [Instance(k, k * span, span, "", 1) for k in range(dp)]
    each = gpn // per  # instances on each node
    return [Instance(k, k // each, 1, ",".join(str((k % each) * per + g) for g in range(per)), each)
            for k in range(dp)]


def instance_config(cfg: Config, inst: Instance) -> Config:
    """The config of one instance: the replica's, with one instance's layout (its nodes, TP x PP GPUs, D = 1),
    its nodes' engine.node_env values, its GPUs as CUDA_VISIBLE_DEVICES, a fixed engine.port or master_port
    moved by its index (instances on one node cannot share one) and its share of cluster.cpus_per_task; for
    engine=endpoint, its one engine.url."""
    layout, e = cfg.layout, cfg.engine
    if inst.url is not None:
        return replace(cfg, engine=replace(e, url=inst.url))
    per = layout.tensor_parallel * layout.pipeline_parallel
    node_env = {name: list(values[inst.first_node:inst.first_node + inst.nodes]) for name, values in e.node_env.items()}
    if inst.gpus:
        node_env["CUDA_VISIBLE_DEVICES"] = [inst.gpus] * inst.nodes
    engine = replace(e, node_env=node_env, port=e.port + inst.index if e.port else 0,
                     master_port=e.master_port + inst.index if e.master_port else 0)
    cpus = cfg.cluster.cpus_per_task
    cluster = replace(cfg.cluster, cpus_per_task=max(1, cpus // inst.per_node) if cpus else cpus)
    return replace(cfg, engine=engine, cluster=cluster,
                   layout=replace(layout, nodes=inst.nodes, gpus_per_node=min(per, layout.gpus_per_node),
                                  data_parallel=1))


def instance_place(inst: Instance) -> str:
    """Where an instance runs, in words (render, run.log)."""
    if inst.url is not None:
        return inst.url
    if inst.gpus:
        return f"GPU{'s' if ',' in inst.gpus else ''} {inst.gpus} of node {inst.first_node}"
    last = inst.first_node + inst.nodes - 1
    return f"node {inst.first_node}" if last == inst.first_node else f"nodes {inst.first_node}-{last}"


def owner_name(replica: int, instance: int | None = None) -> str:
    """Who claims units: `r<replica>`, or `r<replica>i<k>` for instance k of a replica of pinned instances."""
    return f"r{replica}" if instance is None else f"r{replica}i{instance}"


def owner_replica(owner: str) -> int | None:
    """The replica of an owner name (`r3`, `r3i1`: 3); None for anything else."""
    head, _, tail = owner[1:].partition("i")
    if not owner.startswith("r") or not head.isdigit() or (tail and not tail.isdigit()) or owner.endswith("i"):
        return None
    return int(head)


def problems(cfg: Config, adapter) -> list[str]:
    """What pinned instances cannot do with the config; checked before submission."""
    if not pinned(cfg, adapter):
        return []
    if adapter.starts_process and "CUDA_VISIBLE_DEVICES" in cfg.engine.node_env and instances(cfg, adapter)[0].gpus:
        return [f"layout.data_parallel={cfg.layout.data_parallel} pins each engine instance to its own GPUs with "
                f"CUDA_VISIBLE_DEVICES; drop engine.node_env.CUDA_VISIBLE_DEVICES (or use layout.data_parallel=1)"]
    return []
