"""The messages of edgetune's wire as plain Python values (no protobuf here).

Nodes, the coordinator and the edge client speak in these dataclasses;
`edgetune.runtime.wire.serde` alone turns them into protobuf frames and back.
Tensors are torch tensors keyed by name; the codec says how activations and
their gradients are compressed on the wire (adapter tensors always travel
exactly, see serde).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CODECS = ("fp32", "fp16", "bf16", "int8")  # activation / activation-gradient codecs
ADAPTER_CODECS = ("raw", "bf16", "int8")  # adapter deltas and adapter gradients (raw: exact)
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Hop:
    """One stage of a route: node `name` at `address` runs blocks [start, end); a node's own
    hop in Opened also says how it holds them (dtype fp32/bf16/fp16, quantize none/int8/nf4)."""

    name: str
    address: str
    start: int
    end: int
    dtype: str = ""  # "": not said
    quantize: str = ""


# -- down the route (edge -> nodes) -----------------------------------------------
@dataclass
class Open:
    session_id: str
    model: str
    fingerprint: str
    route: list[Hop]  # the receiving node first
    codec: str = "fp32"
    methods_json: str = "[]"
    adapter_codec: str = "raw"  # how adapter deltas and gradients travel (ADAPTER_CODECS)
    owner: str = ""  # the edge identity (set by the first node from the edge's certificate)
    micro_batch_size: int = 0  # sequences per micro-batch, at most (admission by memory; 0: unknown)
    seq_len: int = 0  # tokens per sequence, at most
    micro_batches: int = 0  # micro-batches whose activations a step keeps
    constants_digest: str = ""  # peft.adapter.constants_digest of the methods' shared constants ('' if none)


@dataclass
class AdapterPush:
    version: int
    tensors: Tensors  # "{method}.{layer}.{name}"
    delta: bool = False  # add to the node's replica (encoded with the session's adapter codec) instead of replacing it
    hops_ahead: int = 0  # 0: for the receiving node; n: relayed unopened to the node n hops further down


@dataclass
class Forward:
    step: int
    micro: int
    version: int
    train: bool
    dropout_key: tuple[int, ...] | None
    hidden: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor | None = None  # (B, T), 1 = real token
    echo: bool = False  # every node also sends its stage's output up, exact (StageOutput): it is verified
    recompute: bool = False  # a verifier replica's recomputation: computed as `train` says, nothing kept


@dataclass
class Backward:
    step: int
    micro: int
    grad: torch.Tensor  # (B, T, D), dL/d(output of the route's last block)
    input_grad: bool = True  # False: the sender needs no dL/d(input) back (the edge, unless prompt tuning)


@dataclass
class EndStep:
    step: int
    version: int


DownMessage = Open | AdapterPush | Forward | Backward | EndStep


# -- up the route (nodes -> edge) ------------------------------------------------
@dataclass
class Opened:
    route: list[Hop]


@dataclass
class ForwardResult:
    step: int
    micro: int
    hidden: torch.Tensor


@dataclass
class StageOutput:
    """What one node's blocks made of a Forward with echo set (fp32 on the wire, whatever the codec)."""

    step: int
    micro: int
    node: str
    hidden: torch.Tensor  # (B, T, D)


@dataclass
class BackwardResult:
    step: int
    micro: int
    grad: torch.Tensor | None  # dL/d(input of the route's first block); None when not asked for


@dataclass
class StageTiming:
    name: str
    forward_s: float = 0.0
    backward_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Gradients:
    step: int
    version: int
    tensors: Tensors
    timings: list[StageTiming] = field(default_factory=list)


@dataclass
class ItemError:
    """A failure of one item that leaves the session usable (code: a grpc.StatusCode name)."""

    code: str
    message: str
    node: str = ""
    step: int = 0
    micro: int = 0


UpMessage = Opened | ForwardResult | StageOutput | BackwardResult | Gradients | ItemError


# -- unary -------------------------------------------------------------------------
@dataclass
class NodeInfo:
    name: str
    model: str = ""
    fingerprint: str = ""
    start: int = 0
    end: int = 0
    device: str = ""
    sessions: int = 0
    cached_activations: int = 0
    loaded_bytes: int = 0
    busy_fraction: float = 0.0
    open_sessions: list[SessionInfo] = field(default_factory=list)
    free_bytes: int = 0  # memory left for new sessions (admission)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    owner: str  # the edge identity that opened it ("" under --insecure)
    reserved_bytes: int = 0


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass
class Route:
    model: str
    fingerprint: str
    hops: list[Hop]
    num_layers: int
    manifest: list[ManifestEntry] = field(default_factory=list)
    verifiers: list[Hop] = field(default_factory=list)  # asked for (verify): a replica of each hop's blocks


@dataclass(frozen=True)
class RouteRequest:
    """An edge's GetRoute: `failed` addresses it could not reach, `exclude` node names it banned."""

    model: str
    failed: tuple[str, ...] = ()
    verify: bool = False  # answer with verifier replicas (Route.verifiers)
    exclude: tuple[str, ...] = ()


@dataclass
class NodeStatus:
    name: str
    ray_node_id: str = ""
    host: str = ""
    alive: bool = True
    device: str = "cpu"
    gpu_name: str = ""
    memory_bytes: int = 0
    cpus: int = 0
    threads: int = 0
    block_time_s: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    stages: list[Hop] = field(default_factory=list)
    info: NodeInfo | None = None
    dtype: str = ""  # precision of its blocks once profiled: fp32, bf16, fp16
    quantize: str = ""  # how its blocks' linear weights are held once profiled: none, int8, nf4
    kernels: str = ""  # what its blocks run once profiled: eager, compiled, fused
    banned_s: float = 0.0  # seconds left of its ban (its shard stopped answering); 0: not banned


@dataclass
class ClusterStatus:
    ray_address: str
    nodes: list[NodeStatus]
    models: list[str] = field(default_factory=list)


@dataclass
class JoinReply:
    ray_address: str
    ray_auth_token: str = ""
    ray_auth_mode: str = ""
    ray_tls_cert: bytes = b""  # Ray's own TLS (a Ray-only CA); empty when Ray runs without it
    ray_tls_key: bytes = field(default=b"", repr=False)
    ray_tls_ca: bytes = b""


@dataclass(frozen=True)
class Enrolled:
    """A joiner's certificate, the CA, and the coordinator's mutual-TLS address."""

    cert_pem: bytes
    ca_pem: bytes
    coordinator: str


@dataclass
class EdgePart:
    """The edge's part of a model: small files (config.json, tokenizer) and edge tensors."""

    files: dict[str, bytes]
    tensors: Tensors
