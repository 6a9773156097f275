"""The one error base: every error in what the user gave (config, paths, files, data) is a LoRIError.

``lori`` (``lori.commands.main``) reports a LoRIError as one line ``lori: error: ...`` and exit code 2;
any other exception is a bug and keeps its traceback. Each subclass stays a ``ValueError`` (or the
built-in it was) as well, so library callers that catch those keep working.
"""


class LoRIError(Exception):
    """An error in what the user gave; the message names the bad value and the fix."""
