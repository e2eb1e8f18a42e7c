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


class MetricsError(ValueError):
    """A whole line of metrics.jsonl that is not a JSON object, phrased as one line that names the line."""


USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, MetricsError)


class PreemptedError(RuntimeError):
    """A stop signal (SIGUSR1/SIGTERM) reached the run; it checkpointed and exits so the job can be requeued."""


class HungError(RuntimeError):
    """No training step finished within train.watchdog seconds (a hung or dead rank)."""


class DiskError(RuntimeError):
    """A checkpoint or metrics write failed (e.g. No space left on device); the previous checkpoint is intact."""


# Exit codes of `flowers-dist` (documented in docs/cluster.md, "Exit codes"; launch/slurm.sbatch requeues on EXIT_PREEMPTED).
EXIT_OK = 0
EXIT_USER_ERROR = 2  # one-line error: config, data, weights, unreadable checkpoint, run folder in use
EXIT_HUNG = 69  # EX_UNAVAILABLE: a peer rank stopped answering (watchdog or collective timeout)
EXIT_DISK = 74  # EX_IOERR: a checkpoint or metrics write failed
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume (requeue) to continue
