"""What a resumed run leaves in its folder: ``metrics.jsonl`` holds every step once."""

from __future__ import annotations

import json
from types import SimpleNamespace

from clipfnd.train.metrics import MetricsWriter


class _Acc(SimpleNamespace):
    is_main_process = True

    def log(self, *a, **k):
        pass


def test_resume_keeps_only_the_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 11, "lo')  # a line cut by a kill
    w = MetricsWriter(tmp_path, _Acc(), fresh=False, keep_until=6)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    w.write({"step": 7, "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, 8))
    MetricsWriter(tmp_path, _Acc(), fresh=True)
    assert path.read_text() == ""
