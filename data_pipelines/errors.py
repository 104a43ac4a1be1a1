"""The one error of the data package: bad data or a bad data location, named in one line.

A module of its own (it imports nothing) so that every module of ``data_pipelines`` can raise
it without importing another that imports it back."""

from __future__ import annotations


class DataError(RuntimeError):
    """Bad data or a bad data location; the message names the file, sample or key."""
