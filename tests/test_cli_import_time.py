"""``clipfnd --help`` and ``clipfnd data ... --help`` start fast: they import neither torch nor
webdataset (which imports torch). Checked by the modules imported, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "webdataset")

HELP_PROBE = """
import json, sys
from clipfnd.cli.main import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as e:
    code = e.code
else:
    code = None
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def _probe(code: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [[], ["data"], ["data", "synthetic"], ["data", "digits"], ["data", "build"]]
    + [["data", "index"], ["data", "verify"]],
    ids=lambda a: " ".join(a) or "clipfnd",
)
def test_help_imports_no_torch(argv):
    got = _probe(HELP_PROBE % (HEAVY,), *argv)
    assert got["code"] == 0  # argparse printed the help and exited
    assert got["heavy"] == []


def test_data_error_import_is_light():
    """The shard format's names (DataError, ShardSet, the manifest) need no webdataset."""
    code = (
        "import json, sys\n"
        "from data_pipelines import DataError, ShardSet, load_shard_set\n"
        "import data_pipelines.shards, data_pipelines.synthetic\n"
        f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    assert _probe(code)["heavy"] == []
