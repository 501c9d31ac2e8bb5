"""The user-facing error type, importable from every layer (it depends on nothing).

An error the user caused and can fix (a bad config key, a malformed file, a refused input): the
entry point prints it as one line, `error: ...`, exit status 2, with no traceback.
"""


class UserError(Exception):
  """An error the user caused and can fix (bad config key, malformed file, ...)."""
