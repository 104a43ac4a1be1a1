"""The training recipe (``loop``), its step (``step``, ``objective``), checkpoints, metrics and
schedules. ``clipfnd train`` runs ``loop.train``."""
