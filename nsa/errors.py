"""User-facing errors.

Everything a user can get wrong (config typos, wrong types, missing files, unreachable dataset,
incompatible checkpoint) raises `UserError`. Command-line entry points catch it, print the message
without a traceback and exit with `UserError.exit_code` (2).
"""


class UserError(Exception):
    """A mistake the user can fix. The message names the thing and the fix."""

    exit_code = 2
