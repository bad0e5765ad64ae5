"""Errors the user fixes (the command line, the config, the data on disk), as opposed to bugs.

`python -m metachex_jax.main` prints a UserError's message without a traceback and exits with status 2; anything
else is a bug and keeps its traceback. Raise the most specific class, so that library callers can still catch
the built-in type (a missing dataset is a FileNotFoundError too).
"""


class UserError(Exception):
    """A problem the user fixes; the message says what and how."""


class ConfigError(UserError, ValueError):
    """The config has problems (configs/config_lib.validate; or the data it names is missing, the data preflight):
    `.problems` lists every one, the message names them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) with the config:\n"
                         + "\n".join("  " + p.replace("\n", "\n    ") for p in self.problems))


class ConfigArgumentError(UserError, ValueError):
    """A bad argument after the config file's colon (`configs/pretrain.py:res=abc`)."""


class MissingDataError(UserError, FileNotFoundError):
    """A prepared dataset the run needs is not there; the message holds the commands that prepare it."""


class NonFiniteLossError(FloatingPointError):
    """A training loss that is NaN or infinite: the run stops loudly (the last good checkpoint is kept)."""


class ModelError(ValueError):
    """MODEL cannot be used as asked (not a model, no such output, ...); raised before any work starts."""
