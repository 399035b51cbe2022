"""The one exception raised for every data problem."""

from __future__ import annotations


class DataError(Exception):
    """A dataset could not be found, fetched, verified or parsed.

    The message names the file or source at fault and what is wrong with it, so that the command
    line can print it as it is, without a traceback.
    """
