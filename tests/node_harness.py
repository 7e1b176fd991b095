"""In-process worker nodes on loopback gRPC, for tests that need no Ray.

`start_route(folder, splits)` serves blocks [0, s1), [s1, s2), ... of a model
from node servers in this process (real Shard + NodeServicer + gRPC), and
`patch_connect` makes `finetune(coordinator=...)` use that route instead of
asking a coordinator. `start_route(..., verifiers=True)` serves a verifier replica of
each stage too (finetune --verify), `add_node` one more node (a spare), and
`perturb_outputs` turns a node faulty (a test-only fault mode). The Ray-backed path
(coordinator placing shard actors) is tested in test_cluster.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgetune.runtime.wire import messages as wire


@dataclass
class LocalRoute:
    route: wire.Route
    token: str
    token_file: Path
    servers: list = field(default_factory=list)
    shards: list = field(default_factory=list)
    authority: object = None  # a test CA when the nodes serve mutual TLS (start_route(tls=True))
    revoked: object = None  # the nodes' shared Revocations (TLS)

    @property
    def trust(self):
        """The edge's Trust: an edge certificate named "edge" (TLS), else the shared token."""
        return self.edge_trust("edge")

    def edge_trust(self, name: str):
        from edgetune.runtime.security.access import Trust

        if self.authority is None:
            return Trust.insecure(self.token)
        cert, key = self.authority.issue_keypair(name, "edge", valid_s=3600)
        return Trust.mutual(self.authority.cert_pem, cert, key)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


def start_route(folder: Path, splits: list[int], token_dir: Path, max_cached: int = 64, device: str = "cpu",
                dtype=None, quantize: str = "none", tls: bool = False, memory_bytes: int = 0,
                authority=None, limits=None, verifiers: bool = False) -> LocalRoute:
    """Nodes serving blocks [0, s1), [s1, s2), ... of `folder`; `dtype`: their blocks' torch dtype (fp32);
    `quantize`: how their linear weights are held (edgetune node --quantize); `tls`: mutual TLS with
    certificates from a test CA, each node admitting only the node before it (else --insecure's
    token), from `authority` (a runtime.security.ca.Authority) when given; `memory_bytes`: each
    node's admission budget (0: none); `limits`: each node's nodes.service.NodeLimits (the defaults);
    `verifiers`: also a verifier replica of each stage (Route.verifiers, finetune --verify), the
    replica of stage i named after node i + 1 (the next node hosts it, as a coordinator would place it)."""
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint
    from edgetune.runtime.security.access import Revocations
    from edgetune.runtime.security.ca import Authority
    from edgetune.runtime.wire import rpc

    config = ModelConfig.from_file(Path(folder) / "config.json")
    token_file = Path(token_dir) / "token"
    token = rpc.write_token(token_file)
    manifest = checkpoint_manifest(folder)
    fp = fingerprint(manifest)
    bounds = [0, *splits, config.num_layers]
    route = LocalRoute(wire.Route(str(folder), fp, [], config.num_layers, manifest), token, token_file,
                       authority=(authority or Authority.create("test cluster")) if tls else None,
                       revoked=Revocations())
    options = dict(max_cached=max_cached, device=device, dtype=dtype, quantize=quantize, memory_bytes=memory_bytes,
                   limits=limits)
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        route.route.hops.append(add_node(route, folder, f"node-{i}", start, end, f"node-{i - 1}" if i else "", **options))
    if verifiers:
        n = len(route.route.hops)
        route.route.verifiers = [add_node(route, folder, f"node-{(i + 1) % n if n > 1 else 1}", h.start, h.end, **options)
                                 for i, h in enumerate(route.route.hops)]
    return route


def add_node(local: LocalRoute, folder: Path, name: str, start: int, end: int, previous: str = "", *,
             max_cached: int = 64, device: str = "cpu", dtype=None, quantize: str = "none", memory_bytes: int = 0,
             limits=None) -> wire.Hop:
    """One more node server of `local`'s cluster, serving blocks [start, end) of `folder` as node `name`
    (admitting edges when `previous` is "", else only that node under TLS); returns its hop."""
    import torch

    from edgetune.nodes.service import NodeLimits, serve
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.compute.quantize import quantize_blocks
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.security.authority import peer_host

    part = load_model(folder, start=start, end=end, edge=False, device=device, dtype=dtype or torch.float32)
    quantize_blocks(part, quantize)
    shard = Shard(name, str(folder), part, local.route.fingerprint, max_cached=max_cached, quantize=quantize,
                  memory_bytes=memory_bytes)
    trust = Trust.insecure(local.token)
    if local.authority is not None:
        cert, key = local.authority.issue_keypair(name, "node", ips=["127.0.0.1"], dns=[peer_host(name)], valid_s=3600)
        trust = Trust.mutual(local.authority.cert_pem, cert, key)
    server, port = serve(shard, trust, host="127.0.0.1", port=0, previous=previous, revoked=local.revoked,
                         limits=limits or NodeLimits())
    local.servers.append(server)
    local.shards.append(shard)
    return wire.Hop(name, f"127.0.0.1:{port}", start, end)


def perturb_outputs(shard, scale: float, from_step: int = 0) -> None:
    """Test-only fault mode (production code has no such switch): from step `from_step` on, every
    training forward of `shard`'s sessions opened from now returns its output plus seeded noise of
    `scale` x the output's standard deviation -- what bad memory or a miscompiled kernel might do.
    Its downstream hop and its echo get the same wrong output."""
    import torch

    open_session = shard.open_session

    def opening(msg):
        session = open_session(msg)
        forward = session.forward

        def perturbed(m):
            out = forward(m)
            if not m.train or m.step < from_step:
                return out
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1000 * m.step + m.micro))
            return out + scale * out.std() * noise.to(out.device, out.dtype)

        session.forward = perturbed
        return session

    shard.open_session = opening


class _FakeClient:
    def __init__(self, route: wire.Route) -> None:
        self.route = route
        self.address = "in-process nodes"
        self.calls = 0
        self.block_time_s: dict[str, float] = {}  # node -> profiled seconds of one block (none: unprofiled)
        self.alternatives: list[wire.Route] = []  # routes handed out when `route` uses an excluded node
        self.requests: list[dict] = []  # each get_route's failed / verify / exclude

    def status(self) -> wire.ClusterStatus:
        nodes = [wire.NodeStatus(name, block_time_s=t) for name, t in self.block_time_s.items()]
        return wire.ClusterStatus("", nodes, [self.route.model])

    def get_route(self, model, failed=None, timeout_s=0.0, verify=False, exclude=()):
        self.calls += 1
        self.requests.append({"failed": list(failed or ()), "verify": verify, "exclude": list(exclude)})
        for route in [self.route, *self.alternatives]:  # the first that uses none of the excluded nodes
            if not {h.name for h in route.hops + route.verifiers} & set(exclude):
                return route
        from edgetune.runtime.wire.coordinator_client import CoordinatorError

        raise CoordinatorError(f"no route without {sorted(exclude)}", "FAILED_PRECONDITION")

    def close(self) -> None:
        pass


def patch_connect(monkeypatch, local: LocalRoute) -> _FakeClient:
    """finetune(coordinator=...) gets `local`'s route without a coordinator."""
    from edgetune.runtime.train import remote

    client = _FakeClient(local.route)

    def connect(cfg):
        return remote.RemoteTrainer(cfg, client, local.edge_trust(cfg.identity or "edge"), local.route, Path(cfg.model))

    monkeypatch.setattr(remote.RemoteTrainer, "connect", classmethod(lambda cls, cfg: connect(cfg)))
    return client


def shard_step(shard, methods_json: str, views: dict, hidden, grad_out, dropout_key=None):
    """One training micro-batch through `shard`'s session API, as its gRPC servicer drives it: open,
    push the adapter (version 1), forward keeping activations, backward, end of step.

    Returns (session, output, dL/d(input), the step's adapter gradients).
    """
    session = shard.open_session(wire.Open("s", shard.model, shard.fingerprint,
                                           [wire.Hop(shard.name, "", shard.start, shard.end)], methods_json=methods_json))
    session.push_adapter(wire.AdapterPush(1, {k: v.detach() for k, v in views.items()}))
    out = session.forward(wire.Forward(0, 0, 1, True, dropout_key, hidden))
    grad_in = session.backward(0, 0, grad_out)
    grads, _ = session.end_step(wire.EndStep(0, 1))
    return session, out, grad_in, grads


def adapter_tensors(run_dir):
    """The adapter a finetune run saved in `run_dir`, as tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_adapters_close(a, b, tol):
    """The same tensors, each within `tol` (max |difference|)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: shape {tuple(a[k].shape)} != {tuple(b[k].shape)}"
        if a[k].numel() == 0:  # e.g. an AdaLoRA module whose every rank was pruned
            continue
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= tol, f"{k}: max |diff| {diff}"
