"""Labels read from user tables (CSV/TSV columns, Hugging Face columns, folder names): the one
rule for turning them into integer ids, used when building shards and when evaluating.

- integers (Python ints, or text that is an integer for every value, e.g. ``"3"``, ``" +3 "``)
  are used as they are, and must be >= 0; their names are ``"0" ... "max"``;
- any other strings are numbered in sorted order of the distinct strings, which are the names;
- a mix of types (ints with floats, say) is refused, naming where.

What counts as a missing label (an empty cell, a ``None``) is the caller's call: building
shards refuses it, evaluation treats the sample as unlabelled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import DataError

INT_TEXT = re.compile(r"\s*\+?\d+\s*")


@dataclass
class LabelMap:
    to_int: dict[Any, int]  # each distinct value -> its id
    names: list[str]  # the name of each id
    from_strings: bool  # the labels were strings (their names mean something)


def label_map(values: Iterable[Any], where: str) -> LabelMap:
    """The ids and names of the (present) label ``values``; ``where`` names their source in
    error messages."""
    distinct = set(values)
    if not distinct:
        return LabelMap({}, [], False)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        ints = {v: int(v) for v in distinct}
    elif all(isinstance(v, str) for v in distinct):
        if all(INT_TEXT.fullmatch(v) for v in distinct):
            ints = {v: int(v) for v in distinct}
        else:
            names = sorted(distinct)
            return LabelMap({v: i for i, v in enumerate(names)}, names, True)
    else:
        kinds = sorted({type(v).__name__ for v in distinct})
        raise DataError(f"{where}: labels must be integers or strings, found {', '.join(kinds)}")
    negative = sorted(v for v in ints.values() if v < 0)
    if negative:
        raise DataError(f"{where}: integer labels must be >= 0, found {negative[0]}")
    return LabelMap(ints, [str(i) for i in range(max(ints.values()) + 1)], False)
