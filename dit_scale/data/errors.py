"""DataError: the data stopped the run (too many corrupt samples, no progress, shards that changed under a resume).

It is a ConfigError, so an entry point that reports ConfigError prints its one-sentence message and exits 2, and
a RuntimeError, for callers that catch "the loader failed while running". Loader worker processes never raise it
across the process boundary: they hand the message to the training process, which raises it there (loader.py).
Defined in `dit_scale/errors.py` (the leaf module of the user-error types), re-exported here.
"""
from dit_scale.errors import DataError

__all__ = ["DataError"]
