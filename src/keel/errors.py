"""The one exception type for mistakes a user can fix (bad path, bad config, bad data).

The CLI catches it once and prints its message as one sentence without a traceback;
internal invariants use `assert` instead.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the input and the fix."""
