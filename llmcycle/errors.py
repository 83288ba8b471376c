"""User-facing errors.

Anything a user can cause (a bad recipe, a corrupt checkpoint, an empty corpus) is raised as
`LlmcycleError` with one sentence that names the file and the problem. The CLI prints that
sentence and exits with status 2 instead of showing a stack trace from deep inside torch.
"""


class LlmcycleError(Exception):
    """An error caused by the user's input, reported as one clear sentence."""


class ConfigError(LlmcycleError):
    """A recipe or command-line override that cannot be accepted."""
