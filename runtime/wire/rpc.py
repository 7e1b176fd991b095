"""gRPC plumbing shared by the edge, the worker nodes and the coordinator.

- Transport security follows a `Trust` (runtime/security/access.py): mutual TLS with the
  process's certificate (the default), or, under `--insecure` on loopback, plaintext where every
  call must carry the metadata `authorization: Bearer <token>` (`write_token` / `load_token`: a
  0600 file, by default ~/.config/edgetune/token). Health checks are no exception. Who may call
  what is the servicers' business (`Gatekeeper.admit`): they see the verified peer certificate.
- Errors: `status_code_for(exc)` maps edgetune's exceptions to gRPC status codes and
  `abort(context, exc)` ends a call with one.
- Deadlines: every RPC the edge or a node makes passes `timeout=` one of the *_TIMEOUT_S
  constants below (or a longer, named one of its own).

Messages themselves are `edgetune.runtime.wire.serde`'s business; this module never
touches edgetune's `*_pb2` messages.
"""
from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from pathlib import Path
from typing import NamedTuple, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgetune.runtime.atomic import atomic_write_text
from edgetune.runtime.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DataError,
    EdgetuneError,
    ModelLoadError,
    SessionError,
    TokenizerError,
    UnsupportedModelError,
    WireError,
)
from edgetune.runtime.security.access import Trust
from edgetune.runtime.security.authority import peer_host
from edgetune.runtime.wire.serde import channel_options

UNARY_TIMEOUT_S = 30.0  # Info, Join, GetRoute, Status: small answers, a slow one is a dead peer
HEALTH_TIMEOUT_S = 5.0  # one health check
CONNECT_TIMEOUT_S = 10.0  # waiting for a channel to become ready
EDGE_PART_TIMEOUT_S = 600.0  # FetchEdgePart: embeddings + LM head, up to a few GB
SESSION_TIMEOUT_S = 7 * 24 * 3600.0  # Node.Session lives as long as a training run; items have their own deadlines

_AUTH_KEY = "authorization"  # gRPC metadata keys are lower-case
_SCHEME = "Bearer "


# -- the shared token -------------------------------------------------------------------
def default_token_path() -> Path:
    """Where `edgetune coordinator` writes the token and nodes/edges look for it by default."""
    return Path.home() / ".config" / "edgetune" / "token"


def write_token(path: Path, token: str | None = None) -> str:
    """Write `token` (default: a fresh random one) to `path`, readable by its owner only; return it."""
    token = secrets.token_urlsafe(32) if token is None else token
    if not token or token != token.strip():
        raise ConfigError("a token must be non-empty and have no surrounding whitespace")
    path = Path(path).expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_text(path, token + "\n")  # the temp file is created 0600, then renamed over `path`
    os.chmod(path, 0o600)
    return token


def load_token(path: Path) -> str:
    """The token stored at `path`; ConfigError saying what to do if it is missing, empty or unreadable."""
    path = Path(path).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"no cluster token at {path}: copy the coordinator's token file there "
                          "(`edgetune coordinator` writes one) or pass the path of one") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the cluster token at {path}: {exc}") from None
    if not token:
        raise ConfigError(f"the cluster token file {path} is empty: copy the coordinator's token file there")
    return token


# -- authentication -----------------------------------------------------------------------
def _rejecting_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts with UNAUTHENTICATED."""

    def reject(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:  # unknown method: still say "unauthenticated", not "unimplemented"
        return grpc.unary_unary_rpc_method_handler(reject)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(reject, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = (_SCHEME + token).encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        values = [v for k, v in (details.invocation_metadata or ()) if k == _AUTH_KEY]
        if not values:
            problem = f"missing '{_AUTH_KEY}: {_SCHEME}<token>' metadata: connect with the cluster token"
        elif hmac.compare_digest(_as_bytes(values[0]), self._expected):
            return continuation(details)
        else:
            problem = "wrong cluster token: use the token file the coordinator wrote"
        return _rejecting_handler(continuation(details), f"{details.method}: {problem}")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "replace")


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to the metadata of every call on a channel."""

    def __init__(self, token: str):
        self._entry = (_AUTH_KEY, _SCHEME + token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != _AUTH_KEY] + [self._entry]
        return _ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                  details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


# -- errors -> status codes ---------------------------------------------------------------
# First match wins, so subclasses come before their bases.
_STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (DataError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (TokenizerError, grpc.StatusCode.FAILED_PRECONDITION),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a servicer answers with when `exc` ends a call.

        exception                              status
        SessionError                           its `code` (default FAILED_PRECONDITION)
        WireError, ConfigError, DataError,     INVALID_ARGUMENT: the request is malformed;
          AdapterError                           resending it unchanged cannot help
        UnsupportedModelError, ModelLoadError, FAILED_PRECONDITION: this server cannot serve
          CheckpointError, TokenizerError        it in its current state (the edge re-routes)
        MemoryError                            RESOURCE_EXHAUSTED
        TimeoutError                           DEADLINE_EXCEEDED
        NotImplementedError                    UNIMPLEMENTED
        anything else                          INTERNAL: a bug, with the exception's message
    """
    if isinstance(exc, SessionError):
        return grpc.StatusCode[exc.code]
    for kind, code in _STATUS_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_message(exc: BaseException) -> str:
    """What a caller is told about `exc`: edgetune's own messages as they are, others with their type."""
    if isinstance(exc, EdgetuneError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the current call with the status `status_code_for(exc)` and the exception's message."""
    context.abort(status_code_for(exc), error_message(exc))
    raise RuntimeError("context.abort returned instead of raising")  # grpc's always raises


# -- servers and channels -----------------------------------------------------------------
# HTTP/2 keepalive pings on every connection, both ways: a peer whose host vanished (no
# TCP reset) or whose process hangs (a stopped process's kernel still acknowledges TCP, but
# nothing answers the ping) is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS
# instead of at the session's deadline: 8 s, so a hung node is rerouted around well within
# 30 s. gRPC also sets TCP_USER_TIMEOUT to KEEPALIVE_TIMEOUT_MS: data unacknowledged that long
# (a cut link) fails the connection, so a cut shorter than Ray's node-death threshold (4 s with
# the coordinator's health checks) still ends in a replay on the same nodes, not a hang.
# Servers accept pings this often, or they would answer with GOAWAY.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 3_000
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]


def make_server(max_workers: int, trust: Trust, *, max_message_bytes: int | None = None,
                max_concurrent_rpcs: int | None = None) -> grpc.Server:
    """A gRPC server that accepts frames up to the serde limit; under `--insecure` it requires the
    token on every call (with TLS the handshake authenticates: add ports with `add_port`).

    Each open Node.Session stream holds one worker thread for its lifetime: size
    `max_workers` for the sessions plus the unary calls served beside them. Calls beyond
    `max_concurrent_rpcs` at once (running or waiting for a thread; None: no limit) end at
    once with RESOURCE_EXHAUSTED. Add the servicers and a port, then `start()` it.
    """
    options = channel_options() if max_message_bytes is None else channel_options(max_message_bytes)
    options = options + KEEPALIVE_OPTIONS
    interceptors = [] if trust.secure else [TokenAuthInterceptor(trust.token)]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edgetune-grpc"),
                       interceptors=interceptors, options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)


def add_port(server: grpc.Server, trust: Trust, address: str, *, client_certificates: bool = True) -> int:
    """Listen on `address` ("host:port"); the bound port, 0 when it could not bind.

    With TLS the server shows its certificate followed by the CA's (so a joiner can check the CA
    against its pin); `client_certificates=False` is for the coordinator's join port only, where
    callers have none yet.
    """
    if not trust.secure:
        return server.add_insecure_port(address)
    if not trust.cert_pem:
        raise ConfigError("a TLS server needs a certificate and its key")
    chain = trust.cert_pem + trust.ca_pem
    creds = grpc.ssl_server_credentials([(trust.key_pem, chain)], root_certificates=trust.ca_pem if client_certificates else None,
                                        require_client_auth=client_certificates)
    return server.add_secure_port(address, creds)


def make_channel(address: str, trust: Trust, *, peer: str | None = None,
                 max_message_bytes: int | None = None) -> grpc.Channel:
    """A channel to `address` ("host:port"): mutual TLS checking that the server's certificate names
    the identity `peer` (default: the address's host among its IP names), or `--insecure`
    plaintext sending the token with every call.

    Close it with `channel.close()` (or use it as a context manager).
    """
    options = channel_options() if max_message_bytes is None else channel_options(max_message_bytes)
    options = options + KEEPALIVE_OPTIONS
    if not trust.secure:
        return grpc.intercept_channel(grpc.insecure_channel(address, options=options), TokenClientInterceptor(trust.token))
    if peer:
        options = options + [("grpc.ssl_target_name_override", peer_host(peer))]
    creds = grpc.ssl_channel_credentials(trust.ca_pem, trust.key_pem or None, trust.cert_pem or None)
    return grpc.secure_channel(address, creds, options=options)


def add_health(server: grpc.Server, services: Iterable[str] = ()) -> health.HealthServicer:
    """Register the standard grpc.health.v1 service, reporting SERVING overall and for `services`.

    `services` are full service names, e.g. "edgetune.v1.Node". The returned servicer's
    `set(name, status)` / `enter_graceful_shutdown()` change what it reports.
    """
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def start_server(add_servicer: Callable[[grpc.Server], None], trust: Trust, host: str, port: int, what: str,
                 max_workers: int = 16, join_port: int | None = None,
                 max_concurrent_rpcs: int | None = None) -> tuple[grpc.Server, int, int | None]:
    """A started server with `add_servicer`'s service and the health service, secured as `trust` says.

    Returns (server, bound port, bound join port or None); port 0 picks a free one. With
    `join_port` (TLS only) it also listens there without asking for client certificates, for
    joiners. ConfigError when it cannot listen.
    """
    server = make_server(max_workers=max_workers, trust=trust, max_concurrent_rpcs=max_concurrent_rpcs)
    add_servicer(server)
    add_health(server)
    bound = add_port(server, trust, _hostport(host, port))
    if bound == 0:
        raise ConfigError(f"{what}: cannot listen on {host}:{port} (port in use, or not an address of this host?)")
    join_bound = None
    if join_port is not None and trust.secure:
        join_bound = add_port(server, trust, _hostport(host, join_port), client_certificates=False)
        if join_bound == 0:
            raise ConfigError(f"{what}: cannot listen for joiners on {host}:{join_port} (port in use?)")
    server.start()
    return server, bound, join_bound


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_health(channel: grpc.Channel, service: str = "", timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """The health status name a server reports for `service` ("SERVING", "NOT_SERVING", ...).

    Raises grpc.RpcError when the server cannot be reached or refuses the call.
    """
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
