"""When progress bars are drawn: only when asked, and only on a terminal. Redirected to a file
(a job's log, CI), a bar's carriage-return updates would fill it with partial lines."""

from __future__ import annotations


def bar_disable(progress: bool) -> bool | None:
    """tqdm's ``disable`` for ``progress``: True (no bar), or None (tqdm's "a bar when its
    stream is a terminal")."""
    return None if progress else True
