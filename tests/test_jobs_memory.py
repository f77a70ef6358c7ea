"""A job reads its dataset through the memory-mapped cache: it never copies a whole dataset into
the server's memory.

Measured on a real server process from /proc: memory a process allocates is anonymous (RssAnon),
while pages of a mapped file it reads count as file-backed (RssFile) and can be dropped and read
again. The server is restarted after the upload, so no buffer of the upload is still held by
its allocator for a copy to reuse unseen; then a job trains two epochs over a 64 MiB dataset and
evaluates over all of it. Had the job, or its evaluation, copied the columns (np.array of a
memmap, reading the cache file into bytes, filling the cache through memory), RssAnon would
have grown by the dataset's size (73 MiB when a copying executor was tried); it grows by about
10 MiB (batches, BLAS buffers), while RssFile grows as the mapped pages are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import WAIT_SECONDS, wait_for, wait_running

EXAMPLES, WIDTH = 16_384, 1024  # float32: 64 MiB
DATASET_BYTES = EXAMPLES * WIDTH * 4
BATCH = 512
EPOCH_STEPS = EXAMPLES // BATCH


def memory(pid: int) -> dict[str, int]:
    """The process's resident memory in bytes: RssAnon, RssFile."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = {name: re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE) for name in ("RssAnon", "RssFile")}
    return {name: int(match.group(1)) * 1024 for name, match in found.items() if match}


def wide_linear() -> cr.GraphBuilder:
    g = cr.GraphBuilder("wide linear", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, WIDTH])
    w = g.parameter("w", np.full((WIDTH, 1), 1e-3, np.float32))
    cr.mean((x @ w) * (x @ w), name="loss")
    return g


def test_a_job_reads_its_dataset_through_the_map_without_copying_it(tmp_path: Path) -> None:
    db = tmp_path / "chainrule.db"
    uploader = ServerProcess(db).start()
    try:
        with cr.Client(uploader.address, timeout=WAIT_SECONDS) as client:
            x = np.random.default_rng(0).normal(size=(EXAMPLES, WIDTH)).astype(np.float32)
            dataset = client.upload_dataset("64 MiB", {"x": x}, progress=False)
            graph_id = client.create_graph(wide_linear()).graph_id
            del x
    finally:
        assert uploader.stop() == 0
    server = ServerProcess(db).start()
    try:
        pid = server.process.pid  # type: ignore[union-attr]
        with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
            before = memory(pid)
            job = client.create_job(
                graph_id,
                dataset.dataset_id,
                loss="loss",
                optimizer=cr.Sgd(1e-4),
                feeds={"x": "x"},
                batch_size=BATCH,
                max_steps=10**9,
                seed=3,
                evaluation=cr.Evaluation(["loss"], every_steps=EPOCH_STEPS, batch_size=4096),
            )
            wait_running(job, past_step=2 * EPOCH_STEPS + 1)
            during = memory(pid)
            mapped = Path(f"/proc/{pid}/maps").read_text()
            assert job.info().state == "running" and job.info().metrics, "the job trained and evaluated"
            job.cancel()
            wait_for(lambda: job.info().ended, "the job to end")
        cache_file = f"{db}.cache/{dataset.sha256}.data"
        assert cache_file in mapped, "the job maps the cache file"
        anonymous, file_backed = during["RssAnon"] - before["RssAnon"], during["RssFile"] - before["RssFile"]
        assert anonymous < DATASET_BYTES / 2, f"RssAnon grew by {anonymous / 2**20:.1f} MiB"
        assert file_backed > DATASET_BYTES / 2, f"RssFile grew by {file_backed / 2**20:.1f} MiB"
    finally:
        server.kill()
