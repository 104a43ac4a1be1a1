"""Errors a user can fix. The CLI prints these (and ``data_pipelines.DataError``) as one line
naming the file, key or sample; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (a config value, a path, a checkpoint, data), with a
    message that says what to change."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt, or of another run."""


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient; the message names
    the checkpoint to go back to (the CLI exits with status 3)."""
