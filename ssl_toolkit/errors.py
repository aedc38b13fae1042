"""The errors the command line reports as one line (``ssl-toolkit CMD: error: ...``), in a module that imports
nothing, so that ``main`` can catch them without first importing Lightning and every method."""


class ConfigError(ValueError):
    """A recipe or flag that does not fit the options, with the parser's reasons."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step, the terms and the last checkpoint."""


class RunStopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM, SLURM's requeue signal) after saving a checkpoint; the message
    says how it resumes."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's code for a process ended by that signal: 130, 143, 138
        self.quiet = quiet  # a DDP rank other than 0: the message is rank 0's to print
