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
