"""Checking the nodes' compute on replicas: `finetune --verify FRACTION`.

A node that computes wrong hidden states (bad memory, a miscompiled kernel, wrong
weights, silent data corruption) trains a wrong adapter without anyone noticing: the
loss only drifts. With --verify the coordinator places a *verifier* replica of every
stage's blocks on another node (Route.verifiers), and the edge recomputes a seeded
FRACTION of the micro-batches there:

1. the step's verified micro-batches are drawn from (seed, step) (`verified_micro_batches`),
   so a replayed step checks the same ones;
2. their Forward carries `echo`: every node of the route sends its stage's output up as
   well, exactly (StageOutput, fp32 whatever the codec);
3. the edge sends each verifier, over a one-hop session of its own, what that stage got:
   the embeddings for stage 0, stage k-1's echoed output for stage k, both through the
   activation codec as the route's nodes received them, with the same dropout key and the
   same adapter version (pushed whole, only on steps that verify something). A verifier
   runs the training path but keeps nothing (`Forward.recompute`) and never gets a
   Backward, so its session holds no state across micro-batches;
4. before the step's gradients reach the master tensors, each stage's echo is compared
   with its verifier's output (`relative_error` against `tolerance`, which follows from
   both nodes' dtype and quantization as they state in Opened). A mismatch is logged, the
   stage's node is banned for the rest of the run (the coordinator is asked for routes
   without it, and the edge refuses any route through it), and the step is replayed from
   scratch on a new route (RouteFailure): no optimizer step ever sees its gradients.

Each check of a stage is independent of the others' (its input is the previous stage's
echo, not a verifier's output), so the node that disagrees is the one banned.

Limits, said plainly: the echo flag tells the route's nodes which micro-batches are
checked, so this catches faulty nodes, not a node that lies only where it is not looked
at (hiding the choice would need an echo of every micro-batch: n_stages x one hidden
state per micro-batch more on the edge's link). The verifier is the reference: a faulty
verifier gets an honest stage's node banned. Evaluation forwards are not verified.
"""
from __future__ import annotations

import logging
import random
import uuid

import torch

from edgetune.runtime.errors import ConfigError, EdgetuneError
from edgetune.runtime.train.remote import RouteFailure, RouteStream
from edgetune.runtime.wire import messages as wire
from edgetune.runtime.wire import serde

log = logging.getLogger("edgetune.verify")

# The worst token's relative error (`relative_error`) two honest nodes may show on the same
# blocks and input, by the coarser precision of the two, against an fp32 node (measured on
# SmolLM2-135M, 4 and 15 of its blocks in one stage, CPU: fp32 0 on one machine (another device
# sums in another order: ~1e-6); fp16 1.1e-2; bf16 4.9e-2), with about 3x to spare.
DTYPE_TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 0.15}
# Added when the two nodes hold their weights differently (measured against unquantized fp32:
# int8 4.3e-2, nf4 0.43 -- a check across that gap catches only gross errors, so the coordinator
# prefers a verifier quantized as the stage's node is). The same scheme dequantizes to the same
# weights: both alike add nothing beyond their dtype's term.
QUANTIZE_TOLERANCE = {"none": 0.0, "int8": 0.15, "nf4": 1.2}


def tolerance(a_dtype: str, a_quantize: str, b_dtype: str, b_quantize: str) -> float:
    """The largest `relative_error` between two nodes' outputs of the same blocks on the same input
    that still counts as agreement, from how each holds and runs them.

    The coarser dtype sets the base (fp32 < fp16 < bf16); quantized weights add the coarser
    scheme's term unless both nodes use the same scheme.

        >>> tolerance("fp32", "none", "fp32", "none")
        0.0001
        >>> tolerance("bf16", "int8", "fp32", "none")
        0.3
        >>> tolerance("bf16", "nf4", "bf16", "nf4")
        0.15
    """
    for dtype in (a_dtype, b_dtype):
        if dtype not in DTYPE_TOLERANCE:
            raise ConfigError(f"--verify: dtype {dtype!r} has no tolerance (known: {', '.join(DTYPE_TOLERANCE)}); "
                              "a node that does not say its precision cannot be verified")
    for scheme in (a_quantize, b_quantize):
        if scheme not in QUANTIZE_TOLERANCE:
            raise ConfigError(f"--verify: quantization {scheme!r} has no tolerance "
                              f"(known: {', '.join(QUANTIZE_TOLERANCE)})")
    base = max(DTYPE_TOLERANCE[a_dtype], DTYPE_TOLERANCE[b_dtype])
    if a_quantize == b_quantize:
        return base
    return base + max(QUANTIZE_TOLERANCE[a_quantize], QUANTIZE_TOLERANCE[b_quantize])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst token's relative L2 error of `out` (B, T, D) against `ref`: max over (b, t) of
    |out[b, t] - ref[b, t]| / |ref[b, t]|. Per token, so a few corrupted positions are not
    averaged away, and relative to each token's own norm, so the huge hidden states of
    attention-sink tokens set no scale for the others."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.double(), ref.double()
    both = ~torch.isfinite(out) & ~torch.isfinite(ref)  # an overflow both made agrees; one alone never does
    out, ref = out.masked_fill(both, 0.0), ref.masked_fill(both, 0.0)
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)  # (B, T)
    err = torch.nan_to_num(err, nan=float("inf"))
    return float(err.max()) if err.numel() else 0.0


def verified_micro_batches(fraction: float, seed: int, step: int, count: int) -> set[int]:
    """Which of a step's `count` micro-batches to recompute: fraction x count of them on average
    (the fractional part drawn), chosen from (seed, step) alone, so a replay checks the same ones."""
    if fraction <= 0 or count <= 0:
        return set()
    rng = random.Random(f"edgetune-verify:{seed}:{step}")  # str seeds hash the same in every process
    expected = min(1.0, fraction) * count
    n = int(expected) + (rng.random() < expected - int(expected))
    return set(rng.sample(range(count), min(n, count)))


def stage_of(layer: int, hops: list[wire.Hop]) -> int | None:
    return next((i for i, h in enumerate(hops) if h.start <= layer < h.end), None)


class Verifier:
    """The edge's side of --verify for one route: a one-hop session to each stage's verifier,
    the step's echoes and recomputations, and the comparison.

        checks = verifier.begin(step, len(micros), version, held)   # which micro-batches; pushes
        ... send Forward(echo=m in checks); verifier.sent(forward) for those
        ... each StageOutput that comes up: verifier.stage_output(msg)
        verifier.finish(step)   # before the step's gradients count: RouteFailure on a mismatch
    """

    def __init__(self, route: wire.Route, route_precision: list[wire.Hop], trust, template: wire.Open,
                 codec: str, fraction: float, seed: int, reply_timeout_s: float, banned: set[str]) -> None:
        hops, verifiers = route.hops, route.verifiers
        if len(verifiers) != len(hops) or any((v.start, v.end) != (h.start, h.end) or v.name == h.name
                                              for v, h in zip(verifiers, hops)):
            raise EdgetuneError("--verify: the coordinator's route has no verifier replica of every stage on "
                                f"another node (stages {[(h.name, h.start, h.end) for h in hops]}, verifiers "
                                f"{[(v.name, v.start, v.end) for v in verifiers]}); does it predate --verify?")
        self.route = route
        self.precision = route_precision  # the route's nodes' own hops (Opened): dtype and quantization
        self.trust = trust
        self.template = template  # the route's Open: model, fingerprint, methods, shapes
        self.codec = codec  # the route's activation codec: what each stage's input went through
        self.fraction, self.seed = fraction, seed
        self.reply_timeout_s = reply_timeout_s
        self.banned = banned  # the run's banned node names (RemoteTrainer.banned)
        self.streams: list[RouteStream | None] = [None] * len(hops)
        self.version: int | None = None  # what the verifiers hold
        self.bytes_sent = self.bytes_received = 0  # of the sessions closed so far
        self._step = -1
        self._checks: set[int] = set()
        self._forwards: dict[int, wire.Forward] = {}  # micro -> the route's Forward (key, mask)
        self._echoes: dict[tuple[int, int], torch.Tensor] = {}  # (stage, micro) -> its output
        self._sent: dict[int, list[int]] = {}  # stage -> micro-batches sent to its verifier, in order

    # -- a step ---------------------------------------------------------------------------
    def begin(self, step: int, count: int, version: int, held: dict[str, torch.Tensor]) -> set[int]:
        """The step's verified micro-batches; brings the verifiers to `version` (`held`: the adapter
        tensors the route's nodes hold, exactly) when any is verified."""
        self._step, self._forwards, self._echoes, self._sent = step, {}, {}, {}
        self._checks = verified_micro_batches(self.fraction, self.seed, step, count)
        if self._checks and self.version != version:
            self._push(version, held)
        return self._checks

    def sent(self, forward: wire.Forward) -> None:
        """The route's Forward of a verified micro-batch left: stage 0's recomputation leaves now."""
        self._forwards[forward.micro] = forward
        self._recompute(0, forward.micro, forward.hidden.detach())

    def stage_output(self, msg: wire.StageOutput) -> None:
        """A node's echo: kept for the comparison, and the next stage's recomputation leaves."""
        names = [h.name for h in self.route.hops]
        if msg.step != self._step or msg.micro not in self._checks or msg.node not in names:
            raise RouteFailure(f"unexpected stage output of step {msg.step} micro-batch {msg.micro} from node "
                               f"{msg.node!r} during step {self._step}", [])
        stage = names.index(msg.node)
        if (stage, msg.micro) in self._echoes:  # a replayed forward (lost activations): the same again
            return
        self._echoes[(stage, msg.micro)] = msg.hidden
        if stage + 1 < len(names):
            self._recompute(stage + 1, msg.micro, msg.hidden)

    def finish(self, step: int) -> dict[str, float]:
        """Compare every verified stage output with its recomputation; raise RouteFailure (after
        banning the disagreeing nodes) on a mismatch. Returns {"verified": micro-batches checked,
        "verify_error_ratio": the largest error / tolerance seen}."""
        results = self._results()
        worst = 0.0
        liars: list[str] = []
        for stage, hop in enumerate(self.route.hops):
            tol = self._tolerance(stage)
            for micro in sorted(self._checks):
                echo = self._echoes.get((stage, micro))
                if echo is None:
                    raise RouteFailure(f"node {hop.name} sent no output of verified micro-batch {micro}", [hop.address])
                err = relative_error(echo, results[(stage, micro)])
                worst = max(worst, err / tol)
                if err > tol:
                    self._report(step, micro, stage, err, tol)
                    liars.append(hop.name)
        if liars:
            self.banned.update(liars)
            raise RouteFailure(f"verification failed at step {step}: node(s) {', '.join(sorted(set(liars)))} "
                               "computed wrong hidden states and are banned from this run", [])
        return {"verified": len(self._checks), "verify_error_ratio": worst}

    def close(self) -> None:
        for i, s in enumerate(self.streams):
            if s is not None:
                self.bytes_sent += s.bytes_sent
                self.bytes_received += s.bytes_received
                s.close()
                self.streams[i] = None

    def bytes(self) -> tuple[int, int]:
        """(sent, received) on the verifiers' sessions so far."""
        live = [s for s in self.streams if s is not None]
        return (self.bytes_sent + sum(s.bytes_sent for s in live),
                self.bytes_received + sum(s.bytes_received for s in live))

    # -- internals ------------------------------------------------------------------------
    def _stream(self, stage: int) -> RouteStream:
        if self.streams[stage] is None:
            hop = self.route.verifiers[stage]
            one_hop = wire.Route(self.route.model, self.route.fingerprint, [hop], self.route.num_layers)
            # exact both ways (the edge put the route's codec on the input itself); one forward at a time,
            # kept no longer than it runs, is all admission needs to set aside
            t = self.template
            open_msg = wire.Open(uuid.uuid4().hex, t.model, t.fingerprint, [hop], codec="fp32", methods_json=t.methods_json,
                                 adapter_codec="raw", micro_batch_size=t.micro_batch_size, seq_len=t.seq_len, micro_batches=1,
                                 constants_digest=t.constants_digest)
            try:
                self.streams[stage] = RouteStream(one_hop, self.trust, open_msg, self.reply_timeout_s)
            except RouteFailure:
                raise
            except Exception as e:  # grpc.RpcError: cannot connect
                raise RouteFailure(f"cannot reach verifier {hop.name} at {hop.address}: {e}", [hop.address]) from None
        return self.streams[stage]

    def _push(self, version: int, held: dict[str, torch.Tensor]) -> None:
        from edgetune.runtime.peft.adapter import split_block_key

        stages: list[dict[str, torch.Tensor]] = [{} for _ in self.route.hops]
        for key, t in held.items():
            stage = stage_of(split_block_key(key)[1], self.route.hops)
            if stage is not None:
                stages[stage][key] = t.detach()
        for stage, tensors in enumerate(stages):
            self._stream(stage).send(wire.AdapterPush(version, tensors))  # whole and exact: the same replica
        self.version = version

    def _recompute(self, stage: int, micro: int, hidden: torch.Tensor) -> None:
        route_forward = self._forwards[micro]
        # what the stage's node decoded: its input went through the route's activation codec
        x = serde.roundtrip(hidden, self.codec)
        self._stream(stage).send(wire.Forward(self._step, micro, self.version, route_forward.train,
                                              route_forward.dropout_key, x, route_forward.attention_mask,
                                              recompute=True))
        self._sent.setdefault(stage, []).append(micro)

    def _results(self) -> dict[tuple[int, int], torch.Tensor]:
        out = {}
        for stage, micros in self._sent.items():
            stream, hop = self.streams[stage], self.route.verifiers[stage]
            stream.reply_timeout_s = self.reply_timeout_s
            for _ in micros:
                msg = stream.recv()
                if isinstance(msg, wire.ItemError):
                    raise RouteFailure(f"verifier {hop.name}: {msg.code}: {msg.message}", [hop.address])
                if not isinstance(msg, wire.ForwardResult) or msg.step != self._step or msg.micro not in micros:
                    raise RouteFailure(f"verifier {hop.name} answered {type(msg).__name__} during step {self._step}",
                                       [hop.address])
                out[(stage, msg.micro)] = msg.hidden
        return out

    def _tolerance(self, stage: int) -> float:
        mine, theirs = self._precision(self.precision, stage), self._precision(self.streams[stage].opened, 0)
        return tolerance(mine.dtype, mine.quantize, theirs.dtype, theirs.quantize)

    @staticmethod
    def _precision(hops: list[wire.Hop], i: int) -> wire.Hop:
        if i >= len(hops):
            raise RouteFailure(f"the route said {len(hops)} hop(s) when it opened, stage {i} is not one of them", [])
        return hops[i]

    def _report(self, step: int, micro: int, stage: int, err: float, tol: float) -> None:
        hop, verifier = self.route.hops[stage], self.route.verifiers[stage]
        mine, theirs = self.precision[stage], self.streams[stage].opened[0]
        log.warning("verify: step %d micro-batch %d: node %s (blocks [%d, %d), %s/%s) disagrees with verifier %s "
                    "(%s/%s): worst token's relative error %.3g > tolerance %.3g; banning %s from this run and "
                    "replaying the step", step, micro, hop.name, hop.start, hop.end, mine.dtype, mine.quantize,
                    verifier.name, theirs.dtype, theirs.quantize, err, tol, hop.name)
