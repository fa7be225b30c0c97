"""The one exception a config mistake raises; its message says which key and what fits."""


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message says which and what fits."""
