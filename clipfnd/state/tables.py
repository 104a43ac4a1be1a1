"""Per-sample state: named tables of length N keyed by the dataset index.

``StateTables``: every rank holds a full replica of every table (``fnd.state=replicated``).
A step changes only the rows of the samples in the global batch: each rank computes the new
values of its own anchors' rows, then ``write_rows`` all-gathers (indices, values) from every
rank and scatters them into every replica, so the replicas stay identical with ``O(B)``
communication per step and nothing ``O(N)``. ``ShardedTables`` (``fnd.state=sharded``) splits
the rows over the ranks instead. A checkpoint saves them as safetensors (``tables.safetensors``,
or one file per rank when sharded; ``clipfnd.state.files.save_tables`` / ``load_tables``),
never as a pickle.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..errors import CheckpointError, UserError


class TableIndexError(UserError, IndexError):
    """A dataset index outside the tables (names the index and the table size)."""


def first_occurrences(index: torch.Tensor) -> torch.Tensor | None:
    """Positions of the first occurrence of each distinct value of ``index`` (``None`` when
    all values are distinct)."""
    uniq, inverse = torch.unique(index, return_inverse=True)
    if uniq.numel() == index.numel():
        return None
    pos = torch.arange(index.numel(), device=index.device)
    first = torch.full((uniq.numel(),), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin")


class StateTables:
    """Named float32 tables of ``num_rows`` rows.

    Args:
        num_rows: the dataset size N.
        device: where the tables live (the accelerator, or "cpu" for datasets whose tables
            do not fit in accelerator memory; rows are moved to the compute device on read).
    """

    def __init__(self, num_rows: int, device: torch.device | str = "cpu"):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        self.num_rows = num_rows
        self.local_rows = num_rows  # the rows this process holds
        self.device = torch.device(device)
        self._tables: dict[str, torch.Tensor] = {}
        self._init: dict[str, float] = {}

    def add(self, name: str, init: float = 0.0) -> torch.Tensor:
        if name in self._tables:
            raise KeyError(f"table {name!r} already exists")
        self._tables[name] = torch.full(
            (self.local_rows,), float(init), dtype=torch.float32, device=self.device
        )
        self._init[name] = float(init)
        return self._tables[name]

    def names(self) -> list[str]:
        return list(self._tables)

    def __contains__(self, name: str) -> bool:
        return name in self._tables

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tables[name]

    def local(self, name: str) -> torch.Tensor:
        """The rows of ``name`` this rank holds: all of them here (for metrics over rows)."""
        return self._tables[name]

    def check_indices(self, index: torch.Tensor) -> None:
        if index.numel() == 0:
            return
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.num_rows:
            bad = lo if lo < 0 else hi
            raise TableIndexError(
                f"dataset index {bad} is outside the per-sample tables of {self.num_rows} rows "
                "(the dataset's manifest says it has that many samples; a shard with indices "
                "from another dataset would do this)"
            )

    def rows(
        self, name: str, index: torch.Tensor, device: torch.device | None = None
    ) -> torch.Tensor:
        """Values of ``name`` at dataset indices ``index``, on ``device`` (default: index's)."""
        idx = index.to(self.device)
        out = self._tables[name][idx]
        return out.to(device if device is not None else index.device, non_blocking=True)

    @torch.no_grad()
    def write_rows(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Set rows ``index`` of each named table on every rank.

        Each rank passes its own anchors' indices ``[b]`` and new values ``{name: [b]}``; the
        call gathers every rank's rows and writes them all, in one all-gather for the values.
        An index that occurs more than once (a sample drawn twice into one global batch, or
        into two micro-batches of one optimiser step) is written once, from its first
        occurrence in rank order, so every replica makes the same choice.
        """
        names = sorted(values)
        if not names:
            return
        stacked = torch.stack([values[n].detach().to(torch.float32) for n in names], dim=1)
        all_index = distributed.gather(index.to(stacked.device))
        all_values = distributed.gather(stacked)
        idx = all_index.to(self.device)
        vals = all_values.to(self.device)
        first = first_occurrences(idx)
        if first is not None:
            idx, vals = idx[first], vals[first]
        for k, n in enumerate(names):
            self.assign(n, idx, vals[:, k])

    def state_dict(self) -> dict[str, object]:
        return {"num_rows": self.num_rows, "tables": {n: t.cpu() for n, t in self._tables.items()}}

    @torch.no_grad()
    def assign(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows ``rows`` (dataset indices) of ``name``: from ``write_rows``, and from a
        checkpoint of any layout read piece by piece."""
        self._tables[name][rows.to(self.device)] = values.to(self.device, torch.float32)

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["num_rows"] != self.num_rows:
            raise CheckpointError(
                f"checkpoint tables have {state['num_rows']} rows, this run's dataset has "
                f"{self.num_rows}: resume with the same training data"
            )
        tables = state["tables"]
        missing = set(self._tables) - set(tables)  # type: ignore[arg-type]
        if missing:
            raise CheckpointError(f"checkpoint lacks per-sample tables {sorted(missing)}")
        for n in self._tables:
            self._tables[n].copy_(tables[n])  # type: ignore[index]


class ShardedTables(StateTables):
    """``fnd.state: sharded``: rank ``r`` of ``world`` holds the rows ``n`` with
    ``n % world == r``, at local position ``n // world``, so each rank stores N / world rows.

    ``rows`` is a collective (every rank calls it with its own anchors' indices): the ranks
    gather every rank's indices, each owner fills in the values of its rows, and one sum over
    ranks gives every rank all of them, O(B) per call and nothing O(N). ``write_rows`` gathers
    (indices, values) as the replicated tables do and each owner keeps its rows (``assign``). Whole-table
    access (``tables[name]``) does not exist here; ``local`` gives this rank's rows.
    """

    def __init__(self, num_rows: int, device: torch.device | str = "cpu", *, rank: int, world: int):
        super().__init__(num_rows, device)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.rank, self.world = rank, world
        self.local_rows = len(range(rank, num_rows, world))
        self._order: dict[str, int] = {}  # table name -> its row in a fetch
        self._fetched: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, name: str, init: float = 0.0) -> torch.Tensor:
        table = super().add(name, init)
        self._order[name] = len(self._order)
        self._fetched = None
        return table

    def __getitem__(self, name: str) -> torch.Tensor:
        raise UserError(
            f"per-sample table {name!r} is sharded over the processes (fnd.state=sharded); "
            "this detector needs whole tables: use fnd.state=replicated"
        )

    def local(self, name: str) -> torch.Tensor:
        return self._tables[name]

    @torch.no_grad()
    def rows(
        self, name: str, index: torch.Tensor, device: torch.device | None = None
    ) -> torch.Tensor:
        # One exchange brings the rows of every table for ``index`` (a step reads several
        # tables at the same anchors); kept until the next write. Whether it is kept depends
        # only on the call sequence (the same tensor object), which is the same on every rank,
        # so every rank enters the same collectives.
        if self._fetched is None or self._fetched[0] is not index:
            self._fetched = (index, self._fetch(index))
        out = self._fetched[1][self._order[name]].clone()  # the caller's, as a replica's read
        return out.to(device if device is not None else index.device)

    def _fetch(self, index: torch.Tensor) -> torch.Tensor:
        """``[len(self._order), len(index)]``: every table's rows at this rank's ``index``."""
        counts = distributed.gather(torch.tensor([index.numel()], device=index.device))
        even = bool((counts == counts[0]).all())
        everyone = distributed.gather(index) if even else distributed.gather_uneven(index)
        idx = everyone.to(self.device)
        mine = torch.remainder(idx, self.world) == self.rank
        local = torch.div(idx[mine], self.world, rounding_mode="floor")
        values = torch.zeros(len(self._order), idx.numel(), dtype=torch.float32, device=self.device)
        for name, k in self._order.items():
            values[k, mine] = self._tables[name][local]
        values = distributed.all_reduce_sum(values.to(index.device))
        start = int(counts[: self.rank].sum())
        return values[:, start : start + index.numel()]

    def state_dict(self) -> dict[str, object]:
        return {
            "num_rows": self.num_rows,
            "rank": self.rank,
            "world": self.world,
            "tables": {n: t.cpu() for n, t in self._tables.items()},
        }

    @torch.no_grad()
    def assign(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the rows this rank holds (``write_rows`` writes through here too)."""
        self._fetched = None  # rows change
        mine = torch.remainder(rows, self.world) == self.rank
        local = torch.div(rows[mine], self.world, rounding_mode="floor")
        self._tables[name][local.to(self.device)] = values[mine].to(self.device, torch.float32)

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._fetched = None
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise CheckpointError(
                f"checkpoint tables are shard {state.get('rank')} of {state.get('world')}, "
                f"this process holds shard {self.rank} of {self.world}"
            )
        super().load_state_dict(state)
