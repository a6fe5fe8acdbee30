"""User-facing errors.

Anything a user can cause with bad input (an unknown config key or model name, a missing dataset,
an unwritable workdir, a corrupt or mismatched checkpoint, a non-finite loss) raises `UserError`.
The `gaternet` command catches it and prints its message as one line on stderr with a non-zero
exit status and no traceback; library callers get an ordinary exception they can catch.
"""


class UserError(Exception):
  """An error caused by the user's input; its message is one self-contained line."""


class DatasetNotFoundError(UserError):
  """A dataset could not be found locally (and cannot be downloaded here)."""


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt, or does not match the model or config."""


class NonFiniteLossError(UserError):
  """Training produced a non-finite loss; the message names the step."""


class Interrupted(UserError):
  """Training stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint.

  Attributes:
    exit_code: 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell convention.
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopSignal(BaseException):
  """SIGTERM/SIGINT outside a training loop, raised at once from the signal handler
  (preemption.CommandSignals). A BaseException, as KeyboardInterrupt is: raised wherever the
  main thread happens to be, it must not be swallowed by an `except Exception` on the way (it
  was, and the command went on to train its next stages).

  Attributes:
    exit_code: 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code
