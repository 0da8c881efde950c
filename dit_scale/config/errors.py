"""The one error type for a user-fixable configuration problem."""


class ConfigError(ValueError):
    """A user-fixable problem in the configuration or inputs (one sentence naming the field or file and the fix)."""
