"""The one exception type for mistakes a user can make (bad path, bad flag, bad file)."""


class UserError(ValueError):
    """A problem the user can fix. The CLI prints ``error: <message>`` on one line and exits 2."""
