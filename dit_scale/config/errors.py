"""ConfigError, the user-fixable configuration error: defined in `dit_scale/errors.py`, re-exported here."""
from dit_scale.errors import ConfigError

__all__ = ["ConfigError"]
