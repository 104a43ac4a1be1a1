"""Helpers the tests and the benchmarks share (so that no benchmark reaches into ``tests/``):

- ``gloo``: run a function on a real gloo group of spawned CPU processes;
- ``shards``: shards shaped like img2dataset's output, and photo-like JPEGs;
- ``fastclip``: FastCLIP-v3's temperature gradient written from the formulas (float64).

Nothing here is imported by training, evaluation or the CLI.
"""
