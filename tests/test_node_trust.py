"""Nodes under mutual TLS, no Ray: who may open a session where, sessions belonging to their edge,
revocation ending open streams, admission by memory, what a packet capture sees, and several
edges training at once as they would alone."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import time

import grpc
import pytest
import torch

from edgetune.proto.v1 import node_pb2_grpc
from edgetune.runtime.peft import LoraConfig
from edgetune.runtime.peft.adapter import methods_to_json
from edgetune.runtime.security import ca as certs
from edgetune.runtime.security.access import Trust
from edgetune.runtime.security.authority import peer_host
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import rpc, serde
from edgetune.tests.node_harness import patch_connect, start_route

D = 64


@pytest.fixture(scope="module")
def tls_route(tiny64, tmp_path_factory):
    local = start_route(tiny64, [1], tmp_path_factory.mktemp("tls"), tls=True)
    yield local
    local.stop()


class Session:
    """A raw session stream to hop `hop` of the route, as `trust`."""

    def __init__(self, local, trust: Trust, hop: int = 0) -> None:
        self.q: queue.Queue = queue.Queue()
        target = local.route.hops[hop]
        self.channel = rpc.make_channel(target.address, trust, peer=target.name)
        self.call = node_pb2_grpc.NodeStub(self.channel).Session(iter(self.q.get, None), timeout=30)
        self.replies = serde.read_up(self.call)

    def send(self, msg) -> None:
        for frame in serde.down_frames(msg):
            self.q.put(frame)

    def recv(self):
        return next(self.replies)

    def status(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            while True:
                self.recv()
        return err.value

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


def _open(local, session_id="s", hop=0, **kw) -> wire.Open:
    fields = dict(session_id=session_id, model=local.route.model, fingerprint=local.route.fingerprint,
                  route=list(local.route.hops[hop:]), codec="fp32", methods_json=methods_to_json([LoraConfig(r=2)]))
    fields.update(kw)
    return wire.Open(**fields)


def _opened(local, trust: Trust, session_id: str, **kw) -> Session:
    s = Session(local, trust)
    s.send(_open(local, session_id, **kw))
    assert isinstance(s.recv(), wire.Opened)
    for hop in range(len(local.route.hops)):
        s.send(wire.AdapterPush(1, {}, hops_ahead=hop))
    return s


def _forward(s: Session, hidden=None) -> wire.ForwardResult:
    s.send(wire.Forward(0, 0, 1, True, (0, 0, 0), torch.randn(1, 4, D) if hidden is None else hidden))
    out = s.recv()
    assert isinstance(out, wire.ForwardResult), out
    return out


def _node_trust(local, name: str) -> Trust:
    cert, key = local.authority.issue_keypair(name, "node", ips=["127.0.0.1"], dns=[peer_host(name)], valid_s=600)
    return Trust.mutual(local.authority.cert_pem, cert, key)


def test_each_node_serves_only_whom_the_route_puts_before_it(tls_route):
    local = tls_route
    cases = [  # (who calls, which hop, what it is told)
        (_node_trust(local, "node-0"), 0, "the first node of a route serves edges"),
        (local.edge_trust("alice"), 1, "only: node"),
        (_node_trust(local, "node-7"), 1, "is not before this node on the route"),
    ]
    for trust, hop, message in cases:
        s = Session(local, trust, hop)
        s.send(_open(local, "x", hop))
        e = s.status()
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and message in e.details(), e.details()
        s.close()
    other = certs.Authority.create("another cluster")
    cert, key = other.issue_keypair("alice", "edge", valid_s=60)
    s = Session(local, Trust.mutual(local.authority.cert_pem, cert, key))
    s.send(_open(local, "x"))
    assert s.status().code() == grpc.StatusCode.UNAVAILABLE  # no handshake without our CA's signature
    s.close()
    # the node before node-1 may, and so may an edge at node-0: a whole route works
    s = _opened(local, local.edge_trust("alice"), "ok")
    assert _forward(s).hidden.shape == (1, 4, D)
    s.close()


def test_a_session_belongs_to_the_edge_that_opened_it(tls_route):
    local = tls_route
    alice = _opened(local, local.edge_trust("alice"), "mine", owner="bob")  # what an edge writes is ignored
    assert [local.shards[i].sessions["mine"].owner for i in (0, 1)] == ["alice", "alice"]
    bob = Session(local, local.edge_trust("bob"))
    bob.send(_open(local, "mine"))
    e = bob.status()
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to another edge" in e.details()
    bob.close()
    assert _forward(alice).hidden.shape == (1, 4, D)  # alice's session is untouched
    alice.close()


def test_revoking_an_edge_ends_its_open_stream_within_seconds(tls_route):
    local = tls_route
    alice_trust = local.edge_trust("alice")
    alice, bob = _opened(local, alice_trust, "a"), _opened(local, local.edge_trust("bob"), "b")
    _forward(alice)
    started = time.monotonic()
    local.revoked.update({certs.describe(alice_trust.cert_pem).serial})  # what the coordinator hands the nodes
    e = alice.status()
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.details()
    assert time.monotonic() - started < 5.0
    again = Session(local, alice_trust)
    again.send(_open(local, "a2"))
    assert again.status().code() == grpc.StatusCode.PERMISSION_DENIED
    again.close()
    assert _forward(bob).hidden.shape == (1, 4, D)  # others go on
    for s in (alice, bob):
        s.close()
    local.revoked.update(())


def test_a_session_that_does_not_fit_is_refused_with_the_numbers_and_the_others_go_on(tls_route):
    local = tls_route
    first = local.shards[0]
    small = _open(local, "small", micro_batch_size=1, seq_len=16, micro_batches=2)
    first.memory_bytes = first.loaded_bytes() + 3 * first.session_bytes(small)
    try:
        keeper = _opened(local, local.edge_trust("alice"), "small", micro_batch_size=1, seq_len=16, micro_batches=2)
        greedy = Session(local, local.edge_trust("bob"))
        greedy.send(_open(local, "big", micro_batch_size=8, seq_len=4096, micro_batches=8))
        e = greedy.status()
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot admit" in e.details() and "MiB are free" in e.details() and "8 micro-batches of 8 x 4096" in e.details()
        greedy.close()
        assert _forward(keeper).hidden.shape == (1, 4, D)
        info = first.info()
        assert [(s.session_id, s.owner) for s in info.open_sessions] == [("small", "alice")]
        assert info.open_sessions[0].reserved_bytes == first.session_bytes(small) > 0
        keeper.close()
    finally:
        first.memory_bytes = 0


def test_tls_hides_the_activations_and_the_secret_that_plaintext_shows(tiny64, tmp_path):
    """One training step at the wire level, captured on loopback: under --insecure the planted
    activation tensor's bytes and the token are there to read; under TLS (joining included)
    neither the tensor nor the join secret is."""
    from edgetune.coordinator.core import Coordinator
    from edgetune.coordinator.service import serve
    from edgetune.runtime.security.authority import ClusterAuthority
    from edgetune.runtime.wire.coordinator_client import join_cluster
    from edgetune.tests.wirecap import LoopbackCapture

    marker = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(1234))
    planted = marker.numpy().tobytes()[:256]
    seen = {}
    for mode in ("insecure", "tls"):
        server = authority = None
        ports = set()
        if mode == "tls":
            authority = ClusterAuthority(tmp_path / "state")
            cert, key = authority.server_keypair(["127.0.0.1"])
            core = Coordinator(Trust.mutual(authority.ca.cert_pem, cert, key), "ray:0", authority=authority)
            server, port, join_port = serve(core, "127.0.0.1", 0, join_port=0)
            authority.set_listening(f"127.0.0.1:{port}", f"127.0.0.1:{join_port}")
            ports |= {port, join_port}
        local = start_route(tiny64, [1], tmp_path / mode, tls=authority is not None,
                            authority=authority.ca if authority else None)
        ports |= {int(h.address.rsplit(":", 1)[1]) for h in local.route.hops}
        try:
            token = authority.create_token("edge", 60) if authority else None
            secret = (token.secret if token else local.token).encode()
            with LoopbackCapture(ports=ports) as cap:
                trust = join_cluster(str(token), tmp_path / "edge", "alice", "edge").trust() if token else local.trust
                s = _opened(local, trust, "step")
                out = _forward(s, marker)
                s.send(wire.Backward(0, 0, torch.ones_like(out.hidden)))
                assert isinstance(s.recv(), wire.BackwardResult)
                s.send(wire.EndStep(0, 1))
                assert isinstance(s.recv(), wire.Gradients)
                s.close()
            assert cap.dropped() == 0 and len(cap.payload()) > marker.numel() * 4
            seen[mode] = (cap.contains(planted), cap.contains(secret))
        finally:
            local.stop()
            if server is not None:
                server.stop(None)
    assert seen == {"insecure": (True, True), "tls": (False, False)}


def test_three_edges_at_once_end_where_each_would_alone(tiny64, data_file, tls_route, tmp_path, monkeypatch):
    """Three edge processes train on the same two TLS nodes at the same time; each adapter equals
    the one the same run gives alone (fp32 activations, raw adapter traffic)."""
    local = tls_route
    runs = {name: dict(seed=seed, lr=lr) for name, seed, lr in (("alice", 1, 5e-2), ("bob", 2, 2e-2), ("carol", 3, 3e-2))}
    patch_connect(monkeypatch, local)
    solo = {name: _adapter(finetune(_cfg(tiny64, data_file, tmp_path / f"solo-{name}", name, **kw)).adapter_dir)
            for name, kw in runs.items()}
    procs = {}
    for name, kw in runs.items():
        spec = tmp_path / f"{name}.json"
        trust = local.edge_trust(name)
        for part in ("ca_pem", "cert_pem", "key_pem"):
            (tmp_path / f"{name}.{part}").write_bytes(getattr(trust, part))
        spec.write_text(json.dumps({"route": _route_json(local.route), "files": str(tmp_path / name),
                                    "config": _cfg(tiny64, data_file, tmp_path / f"together-{name}", name, **kw).to_dict()}))
        procs[name] = subprocess.Popen([sys.executable, "-c", _EDGE, str(spec)], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for proc in procs.values():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    for name in runs:
        together = _adapter(tmp_path / f"together-{name}" / "adapter")
        assert together.keys() == solo[name].keys()
        for k in together:
            assert (together[k] - solo[name][k]).abs().max().item() <= 1e-5, (name, k)
    assert not all(torch.equal(solo["alice"][k], solo["bob"][k]) for k in solo["alice"])  # they did differ


def _cfg(folder, data, out, name, **kw) -> TrainConfig:
    base = dict(model=str(folder), data=str(data), out=str(out), method="lora", rank=4, alpha=8.0, dropout=0.0,
                target_modules=("q_proj", "v_proj"), steps=3, batch_size=4, micro_batches=2, max_seq_len=32,
                eval_fraction=0.0, save_every=0, progress=False, coordinator="nodes:1", identity=name,
                codec="fp32", adapter_codec="raw")
    base.update(kw)
    return TrainConfig(**base)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _route_json(route: wire.Route) -> dict:
    return {"model": route.model, "fingerprint": route.fingerprint, "num_layers": route.num_layers,
            "hops": [[h.name, h.address, h.start, h.end] for h in route.hops]}


# An edge process: the route and its certificate from files, finetune as usual.
_EDGE = """
import json, sys
from pathlib import Path
from edgetune.runtime.security.access import Trust
from edgetune.runtime.train import remote
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.runtime.wire import messages as wire
from edgetune.tests.node_harness import _FakeClient

spec = json.loads(Path(sys.argv[1]).read_text())
r = spec["route"]
route = wire.Route(r["model"], r["fingerprint"], [wire.Hop(*h) for h in r["hops"]], r["num_layers"], [])
trust = Trust.mutual(*(Path(spec["files"] + "." + p).read_bytes() for p in ("ca_pem", "cert_pem", "key_pem")))
remote.RemoteTrainer.connect = classmethod(lambda cls, c: cls(c, _FakeClient(route), trust, route, Path(c.model)))
finetune(TrainConfig(**spec["config"]))
"""
