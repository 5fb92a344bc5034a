"""Exceptions the engine raises for bad input; each message says what to fix."""


class PDServeError(Exception):
    """Base class of every error pdserve raises on purpose."""


class ModelNotFoundError(PDServeError, FileNotFoundError):
    """The model name or path does not resolve to anything loadable."""


class UnsupportedModelError(PDServeError, ValueError):
    """The checkpoint is readable but its architecture or options are not supported."""


class CorruptCheckpointError(PDServeError, ValueError):
    """A weight or tokenizer file is truncated, malformed or inconsistent with its config."""


class InvalidSamplingParamsError(PDServeError, ValueError):
    """A sampling parameter is out of range, of the wrong type, or unknown."""


class InvalidPromptError(PDServeError, ValueError):
    """A prompt is empty, holds out-of-vocabulary ids, or is not text / token ids."""


class PromptTooLongError(InvalidPromptError):
    """A prompt does not fit the model's context or the KV cache's capacity."""


class TokenizerUnavailableError(PDServeError, RuntimeError):
    """Text was given or asked for, but the model came without a tokenizer."""


class InvalidChatMessagesError(PDServeError, ValueError):
    """Chat messages are not a list of {'role': str, 'content': str}, or the chat template rejects them."""


class InvalidConfigError(PDServeError, ValueError):
    """An engine, cache or scheduler setting is out of range."""


class InsufficientMemoryError(PDServeError, MemoryError):
    """The model's weights or the asked-for KV cache do not fit the device's free memory."""
