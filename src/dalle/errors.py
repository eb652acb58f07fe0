"""Errors that are the user's to fix. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user: a wrong option, a missing file, a dataset that yields nothing."""


class ConfigError(UserError, ValueError):
    """A configuration field has a value it cannot take; the message names the field."""

    def __init__(self, owner: str, field: str, message: str):
        self.owner, self.field = owner, field
        super().__init__(f"{owner}.{field}: {message}")
