"""The errors a user can fix: the CLI prints them as one line instead of a traceback.

They live here, apart from the modules that raise them, so that the command line can catch
them without importing torch or timm (`flowers-dist --help` then starts in a fraction of a second).
"""


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the offending key."""


class DataError(ValueError):
    """A data-set layout problem, phrased as one line that names the folder."""


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be had or do not fit, phrased as one line."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable, phrased as one line."""


USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError)
