"""Errors a user can fix. The CLI prints them as one line; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Base of every error caused by input: names, paths, files, options."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (unknown tag, bad precision, wrong split sizes)."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read as asked (missing files, wrong layout, bad images)."""
