"""The user-error types: a problem the user fixes (a config field, an input file, a checkpoint), each raised with one
sentence naming the field or file and the fix. The entry points exit 2 on them (`launch/*.py`).

    ConfigError       the configuration or an input (a ValueError)
    DataError         the data stopped the run (a ConfigError and a RuntimeError)
    CheckpointError   a checkpoint that cannot be used (a RuntimeError)

A leaf: it imports nothing of dit_scale, so any module may import it without pulling in the config.
"""


class ConfigError(ValueError):
    """A user-fixable problem in the configuration or inputs (one sentence naming the field or file and the fix)."""


class DataError(ConfigError, RuntimeError):
    """The shards cannot feed the run any more; the message says which shard or key and what to do.

    A ConfigError, so an entry point that reports ConfigError prints its message and exits 2, and a RuntimeError,
    for callers that catch "the loader failed while running". Loader worker processes never raise it across the
    process boundary: they hand the message to the training process, which raises it there (data/loader.py)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, wrong model); the message names the file."""
