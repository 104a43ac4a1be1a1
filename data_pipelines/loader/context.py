"""How loader workers start: from a fork server that has imported what they need once."""

from __future__ import annotations

import multiprocessing

# Modules every loader worker needs, imported once in the fork server instead of per worker.
WORKER_PRELOAD = [
    "torch",
    "torchvision",
    "PIL.Image",
    "webdataset",
    "open_clip",
    "data_pipelines.loader",
]


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers start: a fork server, not a fork of the training process.

    A training process has threads (gloo's, TensorBoard's writer, the progress bar's
    monitor); forking it can leave a child holding a lock that no thread will release, and
    the worker hangs at start. The fork server is a fresh single-threaded process (started
    once, with ``WORKER_PRELOAD`` imported) that forks the workers instead. Where there is
    no fork server (Windows), workers are spawned.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx
