"""The error a stage raises for a mistake in what the user gave it: a config value, a file, a folder.

Every stage raises ``ConfigError`` (or a subclass) with one line that names the problem and what would be
right; the CLI (``glmwb``, in recipes/) prints that line and exits with code 2, no traceback. A bug is any
other exception.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake: a bad config value, a missing or malformed input file, a folder of the wrong kind."""
