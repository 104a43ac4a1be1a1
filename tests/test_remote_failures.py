"""Remote shards that change or fail, and credentials that stay secret, against real servers
on 127.0.0.1 (tests/servers.py: http.server without ETags, optionally behind Basic
authentication; an S3-compatible server that checks credentials) and real training runs.

- A shard rewritten at the same size (its samples reordered) is refused by name before any
  of its changed samples is used, with no ETag to tell.
- Every failure of a remote or ``pipe:`` shard (HTTP 500, 404, 401, a refused connection,
  S3 credentials refused, a missing bucket, a ``pipe:`` command that fails) is skipped and
  counted with a reason in words under ``data.on_error=skip``, and one line under ``raise``.
- No output of a failing index or training run holds a credential given in a URL or in a
  ``pipe:`` command.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_index import stream

from clipfnd.cli.main import main
from clipfnd.testing.shards import write_shards
from data_pipelines import DataError, load_shard_set
from data_pipelines.index import index_shards
from data_pipelines.shards import iter_tar_samples

from runs import launch_cmd, write_config
from servers import http_server, s3_server_with_credentials

SHARDS, PER_SHARD = 4, 24  # 18 usable per shard
N = 72
SECRET = "PASSWORD-do-not-log-4417"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Retries as in use, with waits of 10 ms instead of 0.5 s, 1 s, 2 s."""
    import data_pipelines.remote as remote

    monkeypatch.setattr(remote, "DEFAULT_BACKOFF", 0.01)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-failures")
    assert write_shards(root / "cc", SHARDS, PER_SHARD) == N
    return root


@pytest.fixture(scope="module")
def web(shards):
    with http_server(shards) as url:
        yield url, http_server.handler


@pytest.fixture(scope="module")
def locked(shards):
    """The same shards behind Basic authentication (user:SECRET)."""
    with http_server(shards, auth=f"user:{SECRET}") as url:
        yield url, http_server.handler


def _index(sources, out, **kw):
    return index_shards(sources, out, label_field="class", progress=False, workers=1, **kw)


def _rewrite(path: Path, order) -> None:
    """Rewrite tar ``path`` with its samples (members grouped by key) in ``order(keys)``:
    the same members, so the same byte size, headers and all."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]
        fmt = tar.format
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    size = path.stat().st_size
    with tarfile.open(path, "w", format=fmt) as out:
        for key in order(keys):
            for m, data in members:
                if m.name.split(".")[0] == key:
                    out.addfile(m, None if data is None else io.BytesIO(data))
    assert path.stat().st_size == size


def test_a_remote_shard_rewritten_at_the_same_size_is_refused_before_its_changed_samples_are_used(
    shards, tmp_path, monkeypatch
):
    """The probe's case (no ETag, same size, samples reordered), read chunk by chunk: the
    samples of chunks whose headers match are used, the first changed chunk stops the read
    with a line that names the shard and the manifest."""
    import data_pipelines.tars as tars

    monkeypatch.setattr(tars, "CHUNK_BYTES", 8192)  # many chunks in these small shards
    served = tmp_path / "served"
    shutil.copytree(shards / "cc", served / "cc")
    with http_server(served) as url:
        manifest = tmp_path / "h.json"
        m = _index([f"{url}/cc/{{00000..00003}}.tar"], manifest)
        assert all("etag" not in s or s["etag"] is None for s in m["shards"])  # none to tell
        assert len(m["shards"][1]["fingerprint_chunks"]) > 4
        original = [s["__key__"] for s in iter_tar_samples(str(served / "cc" / "00001.tar"))]
        _rewrite(served / "cc" / "00001.tar", lambda k: k[:-2] + k[-2:][::-1])  # last two swap
        _rewrite(served / "cc" / "00002.tar", lambda k: k[::-1])  # all reversed
        ss = load_shard_set(manifest)
        changed = rf"shard {url}/cc/0000{{}}.tar changed since it was indexed into {manifest}"
        seen = []
        with pytest.raises(DataError, match=changed.format(1)):
            for s in iter_tar_samples(ss.shards[1].path, ss.shards[1], ss.manifest):
                seen.append(s["__key__"])
        assert 0 < len(seen) < len(original) - 2 and seen == original[: len(seen)]
        seen = []
        with pytest.raises(DataError, match=changed.format(2)):
            for s in iter_tar_samples(ss.shards[2].path, ss.shards[2], ss.manifest):
                seen.append(s["__key__"])
        assert seen == []  # its first chunk already differs
        with pytest.raises(DataError, match=changed.format(r"[12]")):  # training stops too
            list(stream(ss).epoch(0))


def _edit(manifest: Path, files: dict[int, str]) -> Path:
    """``manifest`` with the file of shard ``i`` replaced by ``files[i]`` (a source that fails
    now, as a shard that failed after it was indexed)."""
    m = json.loads(manifest.read_text())
    for i, f in files.items():
        m["shards"][i]["file"] = f
    out = manifest.with_name(manifest.stem + "-edited.json")
    out.write_text(json.dumps(m))
    return out


def _unreachable(ss, **kw):
    """One epoch with skips: the indices read (each once, whole batches: 2 of 24 when a
    shard's 18 are missing) and the unreachable shards' reasons."""
    it = stream(ss, retries=1, **kw).epoch(0)
    seen = [i for b in it for i in b["index"].tolist()]
    assert len(set(seen)) == len(seen)
    return seen, dict(it.bad), it.bad_examples


KINDS = {
    "500": ("500", r"HTTP 500 Internal Server Error: the server failed; gave up after 1 retries"),
    "404": ("404", r"HTTP 404 Not Found: no shard at this address"),
    "401": ("401", r"HTTP 401 Unauthorized: credentials missing or refused; .*~/.netrc"),
    "refused": (None, r"connection refused by 127.0.0.1:\d+ \(no server listening there\?\)"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_unreachable_web_shard_is_skipped_with_its_reason_or_stops_in_one_line(
    kind, shards, web, tmp_path
):
    url, handler = web
    fault, words = KINDS[kind]
    manifest = tmp_path / "h.json"
    _index([f"{url}/cc/{{00000..00003}}.tar"], manifest)
    bad_url = f"{url}/cc/00000.tar"
    if kind == "refused":
        import socket

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        bad_url = f"http://127.0.0.1:{port}/cc/00000.tar"
        manifest = _edit(manifest, {0: bad_url})
    else:
        handler.faults["00000.tar"] = [fault]
    try:
        ss = load_shard_set(manifest)
        seen, bad, examples = _unreachable(ss)
        assert len(seen) == 48 and set(seen) <= set(range(18, N))  # the other shards'

        assert bad == {(bad_url, "unreachable shard"): 1}, bad
        assert any(e.shard == bad_url and re.search(words, e.reason) for e in examples)
        with pytest.raises(DataError) as raised:
            list(stream(ss, retries=1, on_error="raise").epoch(0))
        line = str(raised.value)
        assert "\n" not in line and line.startswith(f"cannot read shard {bad_url}: ")
        assert re.search(words, line), line
    finally:
        handler.faults.pop("00000.tar", None)


def test_a_failing_pipe_shard_is_skipped_with_its_exit_status(shards, web, tmp_path):
    url, _ = web
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    manifest = tmp_path / "p.json"
    _index([f"pipe:curl -s -f {url}/cc/{{00000..00003}}.tar"], manifest)
    bad = f"pipe:curl -s -f {url}/missing/00000.tar"  # curl -f exits 22 on the 404
    ss = load_shard_set(_edit(manifest, {0: bad}))
    seen, counts, examples = _unreachable(ss)
    assert len(seen) == 48 and set(seen) <= set(range(18, N))
    assert counts == {(bad, "unreachable shard"): 1}
    assert "the pipe: command exited with status 22 (curl -f: an HTTP error status)" in (
        examples[0].reason
    )
    with pytest.raises(DataError, match=r"^cannot read shard pipe:curl .*status 22"):
        list(stream(ss, retries=0, on_error="raise").epoch(0))


@pytest.fixture(scope="module")
def s3(shards):
    """The shards in s3://shards/cc/ on a server that checks credentials."""
    with s3_server_with_credentials() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("shards")
        for p in sorted((shards / "cc").glob("*.tar")):
            fs.put(str(p), f"shards/cc/{p.name}")
        yield env
        s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def _wrong_keys():
    """A wrong secret key (s3fs caches clients with their credentials: cleared both ways)."""
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", f"wrong-{SECRET}")
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def test_s3_credentials_refused_and_a_missing_bucket_are_skipped_or_one_line(s3, tmp_path):
    manifest = tmp_path / "s3.json"
    _index(["s3://shards/cc/"], manifest)
    missing = _edit(manifest, {0: "s3://no-such-bucket/cc/00000.tar"})
    seen, counts, examples = _unreachable(load_shard_set(missing))
    assert len(seen) == 48 and set(seen) <= set(range(18, N))
    assert counts == {("s3://no-such-bucket/cc/00000.tar", "unreachable shard"): 1}
    assert "bucket no-such-bucket does not exist" in examples[0].reason
    with _wrong_keys():
        ss = load_shard_set(manifest)
        seen, counts, examples = _unreachable(ss)
        assert seen == [] and len(counts) == SHARDS
        assert "S3 credentials come from AWS_ACCESS_KEY_ID" in examples[0].reason
        with pytest.raises(DataError, match=r"^cannot read shard s3://shards/cc/0000\d.tar: "):
            list(stream(ss, on_error="raise").epoch(0))


def test_indexing_an_s3_prefix_with_wrong_keys_or_no_bucket_says_so_in_one_line(
    s3, tmp_path, capsys
):
    out = str(tmp_path / "m.json")
    assert main(["data", "index", "s3://no-such-bucket/cc/", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clipfnd: error: bucket no-such-bucket does not exist (s3://no-such-bucket/cc/)"
    with _wrong_keys():
        assert main(["data", "index", "s3://shards/cc/", "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("clipfnd: error: cannot list s3://shards/cc/: ")
    assert "SignatureDoesNotMatch" in err and SECRET not in err


def test_credentials_in_a_source_never_reach_the_manifest_a_log_line_or_an_error(
    shards, locked, tmp_path, capsys, caplog, monkeypatch
):
    url, handler = locked
    with_user = url.replace("http://", f"http://user:{SECRET}@")
    handler.faults["00002.tar"] = ["500"]
    out = tmp_path / "m.json"
    args = ["data", "index", f"{with_user}/cc/{{00000..00003}}.tar", "--out", str(out)]
    args += ["--workers", "1", "--no-progress"]
    try:
        with caplog.at_level(logging.INFO):
            assert main(args) == 2  # shard 2 fails: refused, in one line
            first = capsys.readouterr()
            assert main([*args, "--skip-unreadable"]) == 0
            second = capsys.readouterr()
        pipe = f"pipe:curl -s -f {with_user}/cc/{{00000..00003}}.tar"
        assert main(["data", "index", pipe, "--out", str(tmp_path / "p.json")]) == 2
        third = capsys.readouterr()
    finally:
        handler.faults.pop("00002.tar")
    err = first.err.strip()
    assert "\n" not in err and f"cannot read shard {url}/cc/00002.tar: HTTP 500" in err
    m = json.loads(out.read_text())
    assert m["unreadable_shards"][0]["file"] == f"{url}/cc/00002.tar"
    assert m["unreadable_shards"][0]["error"].startswith("HTTP 500 Internal Server Error")
    assert "is used for this index only and is not written into the manifest" in caplog.text
    assert third.err.startswith(f"clipfnd: error: source pipe:curl -s -f {url}/cc/")
    assert "holds credentials (a URL's user:password@ part)" in third.err
    everything = [first.out, first.err, second.out, second.err, third.out, third.err]
    everything += [caplog.text, out.read_text()]
    assert not [t for t in everything if SECRET in t]
    # what the warning advises works: the credentials from a netrc file
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login user password {SECRET}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    _index([f"{url}/cc/{{00000..00003}}.tar"], tmp_path / "n.json")
    batches = stream(load_shard_set(tmp_path / "n.json")).epoch(0)
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(N))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_training_run_with_failing_remote_shards_writes_no_credential_and_no_traceback(
    shards, web, tmp_path
):
    """Two processes, loader workers: shard 1 is a ``pipe:`` command with a password in its
    URL (as a manifest written before such sources were refused holds it) whose server
    answers 404, shard 2 answers 500. Both are skipped with their reasons, the run ends
    normally, and no file of the run nor any line it printed holds the password (the same
    failures under ``data.on_error=raise``: one line, in the tests above)."""
    url, handler = web
    manifest = tmp_path / "h.json"
    _index([f"{url}/cc/{{00000..00003}}.tar"], manifest)
    with_user = url.replace("http://", f"http://user:{SECRET}@")
    edited = _edit(manifest, {1: f"pipe:curl -s -f {with_user}/missing/00001.tar"})
    handler.faults["00002.tar"] = ["500"]
    run = tmp_path / "run"
    extra = {"data.train": str(edited), "data.val": None, "data.batch_size": 12}
    extra |= {"data.retries": 1, "train.checkpoint_every": 0, "train.epochs": 1}
    config = write_config(tmp_path / "c.yaml", shards, run, extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        ok = subprocess.run(
            launch_cmd(config, (), 2), capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        handler.faults.pop("00002.tar")
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert "Traceback" not in ok.stderr
    assert "HTTP 500 Internal Server Error" in ok.stderr + (run / "train.log").read_text()
    assert "the pipe: command exited with status 22" in ok.stderr + (run / "train.log").read_text()
    texts = {"stdout": ok.stdout, "stderr": ok.stderr}
    for p in run.rglob("*"):
        if p.is_file():
            texts[str(p)] = p.read_bytes().decode("utf-8", "replace")
    assert (run / "metrics.jsonl").is_file() and (run / "summary.json").is_file()
    assert [k for k, t in texts.items() if SECRET in t] == []
