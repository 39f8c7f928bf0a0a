"""The one exception type for mistakes a user can fix (bad file, bad config).

``lightning_sae``'s entry point catches it, prints its message on one line and exits
with status 2, without a stack trace. Programming errors keep their traceback.
"""


class UserError(Exception):
    """A problem with the user's input: its message says what is wrong and how to fix it."""
