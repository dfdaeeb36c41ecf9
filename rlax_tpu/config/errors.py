"""The error raised for a bad config value."""


class ConfigError(ValueError):
    """A config value is invalid. ``field`` is its dotted path, e.g. ``rl.max_staleness``."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config.{field}: {message}")
