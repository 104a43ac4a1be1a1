"""Shards in object storage and on the web, against real servers the tests start on 127.0.0.1:
an S3-compatible server (moto's server mode) and Python's http.server, with faults injected
(a 503 answer, a connection dropped mid-shard). Indexed, streamed, resumed: the same samples
as the same shards read from disk."""

from __future__ import annotations

import json
import logging
import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_index import stream

from clipfnd.testing.shards import write_shards
from data_pipelines import DataError, load_shard_set
from data_pipelines.index import index_shards
from data_pipelines.loader import LoaderState
from data_pipelines.verify import verify_split

from runs import assert_same_losses, launch, write_config
from servers import FaultyHandler

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SHARDS, PER_SHARD = 4, 24  # 18 usable per shard
N = 72
BUCKET = "clipfnd-test"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    assert write_shards(root / "cc", SHARDS, PER_SHARD) == N
    index_shards(
        [str(root / "cc")], root / "local.json", label_field="class", progress=False, workers=1
    )
    return root


@pytest.fixture(scope="module")
def s3(shards):
    """A real S3-compatible server on 127.0.0.1 holding the shards under s3://BUCKET/cc/."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-log")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        for p in sorted((shards / "cc").glob("*.tar")):
            fs.put(str(p), f"{BUCKET}/cc/{p.name}")
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def http(shards):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(FaultyHandler, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _batches(ss, **kw):
    return list(stream(ss, **kw).epoch(0))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("index", "label", "text", "image"):
            assert torch.equal(x[key], y[key]), key


def test_s3_shards_index_and_stream_as_from_disk(shards, s3, tmp_path):
    pattern = f"s3://{BUCKET}/cc/{{00000..{SHARDS - 1:05d}}}.tar"
    m = index_shards(
        [pattern], tmp_path / "s3.json", label_field="class", progress=False, workers=1
    )
    local = json.loads((shards / "local.json").read_text())
    for key in ("num_raw", "num_samples", "offset", "size", "keys", "skipped"):
        assert [s[key] for s in m["shards"]] == [s[key] for s in local["shards"]], key
    assert [s["file"] for s in m["shards"]] == [
        f"s3://{BUCKET}/cc/{i:05d}.tar" for i in range(SHARDS)
    ]
    assert all(s["etag"] for s in m["shards"])
    text = (tmp_path / "s3.json").read_text()
    assert "testing-secret" not in text and "testing-key" not in text  # no credentials
    # a prefix lists the bucket's shards in order: the same manifest
    m2 = index_shards([f"s3://{BUCKET}/cc/"], tmp_path / "s3b.json", label_field="class", workers=1)
    assert m2["shards"] == m["shards"]
    remote, disk = load_shard_set(tmp_path / "s3.json"), load_shard_set(shards / "local.json")
    assert remote.num_samples == N and remote.num_labels == disk.num_labels
    _same(_batches(remote), _batches(disk))
    _same(_batches(remote, rank=1, world=2), _batches(disk, rank=1, world=2))
    report = verify_split(tmp_path / "s3.json", progress=False)  # clipfnd data verify
    assert report.ok, report.problems


def test_resume_mid_epoch_with_remote_shards_is_exact(shards, s3, tmp_path):
    index_shards([f"s3://{BUCKET}/cc/"], tmp_path / "s3.json", label_field="class", workers=1)
    ss = load_shard_set(tmp_path / "s3.json")
    full = list(stream(ss).epoch(1))
    it = stream(ss).epoch(1)
    head = [next(iter(it))]
    state = LoaderState.from_dict(json.loads(json.dumps(it.state().to_dict())))
    rest = list(stream(ss).epoch(1, state))
    _same(head + rest, full)


def test_a_changed_remote_shard_is_refused_by_name(shards, s3, tmp_path):
    prefix = f"{BUCKET}/changed"
    for p in sorted((shards / "cc").glob("*.tar")):
        s3.put(str(p), f"{prefix}/{p.name}")
    index_shards([f"s3://{prefix}/"], tmp_path / "m.json", label_field="class", workers=1)
    data = (shards / "cc" / "00001.tar").read_bytes()
    s3.pipe(f"{prefix}/00001.tar", data[:-1024])  # the same name, other bytes
    with pytest.raises(DataError, match=rf"shard s3://{prefix}/00001.tar changed since"):
        _batches(load_shard_set(tmp_path / "m.json"))


def test_http_faults_are_retried_and_logged_and_the_samples_are_exact(
    shards, http, tmp_path, caplog
):
    url = http.replace("http://", "http://someone:hunter2@")  # a user part is never kept
    m = index_shards(
        [f"{url}/cc/{{00000..00003}}.tar"], tmp_path / "h.json", label_field="class", workers=1
    )
    assert "hunter2" not in (tmp_path / "h.json").read_text()
    assert m["shards"][0]["file"] == f"{http}/cc/00000.tar"
    FaultyHandler.faults.update({"00001.tar": ["503"], "00002.tar": ["drop", "503"]})
    with caplog.at_level(logging.WARNING, logger="data_pipelines.remote"):
        got = _batches(load_shard_set(tmp_path / "h.json"))
    _same(got, _batches(load_shard_set(shards / "local.json")))
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert any(f"{http}/cc/00001.tar" in r and "retry 1 of 3" in r for r in retries), retries
    assert any(f"{http}/cc/00002.tar" in r and "retry 2 of 3" in r for r in retries), retries
    assert not any("hunter2" in r.getMessage() for r in caplog.records)


def test_a_pipe_source_reads_as_open_clip_gives_it(shards, tmp_path):
    src = f"pipe:cat {shards / 'cc'}/{{00000..00003}}.tar"
    m = index_shards([src], tmp_path / "p.json", label_field="class", progress=False, workers=1)
    assert m["num_samples"] == N and m["shards"][0]["size"] is None
    _same(
        _batches(load_shard_set(tmp_path / "p.json")),
        _batches(load_shard_set(shards / "local.json")),
    )


def _config(path: Path, manifest: Path, run: Path) -> Path:
    """2 processes, 9 samples each a step, 4 steps an epoch, 2 epochs, a checkpoint every 2."""
    extra = {
        "data.train": str(manifest),
        "data.val": None,
        "data.batch_size": 18,
        "data.shuffle_buffer": 20,
        "train.checkpoint_every": 2,
        "fnd.start_mask": 0,
    }
    return write_config(path, manifest.parent, run, extra)


@pytest.mark.slow
def test_train_and_evaluate_from_s3_equal_the_same_shards_on_disk(shards, s3, tmp_path):
    """Two processes, loader workers reading from the S3 server, log every step's loss as the
    same run on the same shards on disk does, and evaluate the same. (A resume inside a remote
    shard: test_resume_mid_epoch_with_remote_shards_is_exact, at the loader, which is what a
    resumed run restores; runs killed and resumed: tests/test_train_e2e.py.)"""
    from clipfnd.cli.main import main

    index_shards([f"s3://{BUCKET}/cc/"], tmp_path / "s3.json", label_field="class", workers=1)
    local, remote = tmp_path / "local", tmp_path / "s3"
    launch(_config(tmp_path / "local.yaml", shards / "local.json", local))
    launch(_config(tmp_path / "s3.yaml", tmp_path / "s3.json", remote))
    assert_same_losses(remote, local, range(1, 9))
    results = []
    for run, manifest in ((local, shards / "local.json"), (remote, tmp_path / "s3.json")):
        args = ["eval", "--checkpoint", str(run), "--data", str(manifest)]
        # read in this process: loader workers would come from a fork server started before
        # this module set the S3 credentials (a user sets them before launching)
        args += ["--task", "knn", "--train-data", str(manifest), "--no-progress"]
        args += ["--num-workers", "0"]
        assert main([*args, "--out", str(run / "eval.json")]) == 0
        results.append(json.loads((run / "eval.json").read_text())["metrics"])
    assert results[0] == results[1]
