"""Real servers on 127.0.0.1 for the remote-shard tests: Python's http.server (no ETags, as
``python -m http.server`` serves), with faults queued per file name and optional Basic
authentication, and an S3-compatible server (moto's server mode) that checks credentials."""

from __future__ import annotations

import base64
import collections
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyHandler(SimpleHTTPRequestHandler):
    """http.server, with faults queued per file name: ``503`` (one answer of 503), ``drop``
    (the headers and half the body, then the connection closes), ``down`` (503 always), and
    lasting answers ``500``, ``404``, ``401`` (always). With ``auth`` ("user:password") set,
    every request without those Basic credentials is answered 401."""

    faults: dict[str, list[str]] = {}
    requests: collections.Counter = collections.Counter()
    auth: str | None = None

    def log_message(self, *args):  # quiet
        pass

    def _unauthorized(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="shards"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        if self._refused():
            return
        super().do_HEAD()

    def _refused(self) -> bool:
        if self.auth is not None:
            want = "Basic " + base64.b64encode(self.auth.encode()).decode()
            if self.headers.get("Authorization") != want:
                self._unauthorized()
                return True
        fault = (self.faults.get(Path(self.path).name) or [None])[0]
        if fault in ("500", "404"):
            self.send_error(int(fault))
            return True
        if fault == "401":
            self._unauthorized()
            return True
        return False

    def do_GET(self):
        name = Path(self.path).name
        self.requests[name] += 1
        if self._refused():
            return
        queue = self.faults.get(name, [])
        fault = queue[0] if queue else None
        if fault in ("503", "drop"):
            queue.pop(0)
        if fault in ("503", "down"):
            self.send_error(503, "Service Unavailable")
            return
        if fault == "drop":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextmanager
def http_server(directory: Path, auth: str | None = None) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a fresh ``FaultyHandler`` class: its own faults and
    counts); yields the base URL. ``.handler`` of the function holds the class."""
    handler = type(
        "Handler", (FaultyHandler,), {"faults": {}, "requests": collections.Counter(), "auth": auth}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    http_server.handler = handler
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def s3_server_with_credentials() -> Iterator[dict[str, str]]:
    """An S3-compatible server on 127.0.0.1 that refuses requests without valid credentials:
    yields the environment (endpoint, a valid key pair) a client needs. moto checks signatures
    once its IAM authentication is on; the key pair is an IAM user's allowed to do anything."""
    import boto3
    import moto.settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved_env = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1")
    saved_auth = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="shards")
        key = iam.create_access_key(UserName="shards")["AccessKey"]
        policy = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.put_user_policy(
            UserName="shards",
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on, credentials are checked
        yield {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = saved_auth
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
