"""The project's exceptions: every user-facing error is a LlamaJaxError whose message names the offending key, path
or shape. This module imports nothing of the project's, so that anything may import it."""
from __future__ import annotations


class LlamaJaxError(Exception):
    """Base class: programs print `error: <message>` on one line and exit 2 instead of a traceback (`llama_jax.cli`)."""


class ConfigError(LlamaJaxError):
    """A config key that does not exist or a value that is impossible."""


class TokenizerError(LlamaJaxError):
    """A tokenizer file that is missing, unreadable or of the wrong kind."""


class DataError(LlamaJaxError):
    """A corpus, token store or batch request that cannot be served."""


class CheckpointError(LlamaJaxError):
    """A checkpoint that is missing, incomplete or does not match the model."""


class ConversionError(LlamaJaxError):
    """Weights whose names or shapes do not match the config, or an unknown format."""


class ChatFormatError(LlamaJaxError):
    """A conversation that breaks the chat format's rules."""


class KernelError(LlamaJaxError):
    """A native kernel that was asked for but cannot be built or used here."""
