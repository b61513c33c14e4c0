"""Errors whose message is complete advice for the user (printed by the CLI without a traceback)."""


class UserFacingError(RuntimeError):
    """Raise with a message that says what was wrong and what to do about it."""
