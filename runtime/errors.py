"""edgetune's exceptions: every error a user can cause is one of these.

Messages say what was wrong (naming the file, key or line) and what to do.
"""


class EdgetuneError(Exception):
    """Base class of every error edgetune raises on purpose."""


class ConfigError(EdgetuneError, ValueError):
    """A model or run configuration is invalid or unsupported."""


class ModelLoadError(EdgetuneError):
    """A checkpoint file is missing, corrupt, truncated or does not match its config."""


class UnsupportedModelError(ConfigError):
    """The model uses an architecture or feature edgetune does not implement."""


class TokenizerError(EdgetuneError):
    """A tokenizer or chat template could not be loaded or rendered."""


class DataError(EdgetuneError, ValueError):
    """A training record is malformed; the message names the file and line."""


class AdapterError(EdgetuneError):
    """An adapter is missing, malformed, or does not fit the base model."""


class CheckpointError(EdgetuneError):
    """A training checkpoint is missing, corrupt or incompatible with the run."""


class PartitionError(EdgetuneError, ValueError):
    """The cluster's nodes cannot hold the model's blocks, or their profiles are invalid."""


class WireError(EdgetuneError):
    """A malformed, truncated or oversized message arrived over the wire."""


# The gRPC status code names (grpc.StatusCode members), listed here so this module
# stays importable without grpc; tests/test_rpc.py checks the list against grpc.
GRPC_STATUS_NAMES = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
})


class SessionError(EdgetuneError):
    """A training-session request cannot be served in the session's current state.

    E.g. an unknown session id, a stale adapter version, or a Backward whose saved
    activations were evicted. `code` is the gRPC status name it travels as
    (default FAILED_PRECONDITION: the edge can fix it by re-sending, not by retrying).
    """

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION"):
        if code not in GRPC_STATUS_NAMES or code == "OK":
            raise ValueError(f"SessionError code must be a gRPC status name other than OK, got {code!r}")
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep `code` when pickled (Ray ships exceptions between processes)
        return (type(self), (self.args[0], self.code))


class TrustError(SessionError):
    """A peer is not who it must be, or may not do what it asked: no or a wrong certificate, a revoked
    identity, a role without the right, another edge's session. `code` is UNAUTHENTICATED or
    PERMISSION_DENIED (default)."""

    def __init__(self, message: str, code: str = "PERMISSION_DENIED"):
        super().__init__(message, code)
