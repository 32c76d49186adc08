"""`simla serve` as a real process: it starts on a free local port, answers HTTP with the index's JSON, and
exits when terminated. (The in-process app is covered by test_search_server.py / test_search_cli.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.search import Index

from test_search_index import _write

pytest.importorskip("fastapi", reason="simla serve needs the serve extra (fastapi)")
pytest.importorskip("uvicorn", reason="simla serve needs the serve extra (uvicorn)")

STARTUP_TIMEOUT = 90.0  # importing torch and loading the model on 2 busy cores
QUERY = "a red square"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    for i in range(6):
        _write(root / "photos" / f"p{i}.png", i)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(simla.create_model("simla_tiny", queue_size=8, task="base"), root / "tiny.pt")
    assert main(["index", "build", str(root / "photos"), "--checkpoint", str(checkpoint), "--output",
                 str(root / "idx"), "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    return root / "idx"


def test_simla_serve_process_answers_http_and_exits_when_terminated(index_dir, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    source = str(Path(simla.__file__).resolve().parents[1])  # the simla under test, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "simla.cli", "serve", str(index_dir), "--host", "127.0.0.1",
                                    "--port", str(port), "--device", "cpu"],
                                   stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert process.poll() is None, f"simla serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                status, kind, body = _get(f"{base}/api/info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"simla serve did not answer in {STARTUP_TIMEOUT:.0f} s:\n" \
                                                    f"{log.read_text()[-3000:]}"
                time.sleep(0.25)
        assert status == 200 and kind.startswith("application/json")
        info = json.loads(body)
        assert info["items"] == 6

        status, kind, body = _get(f"{base}/api/search?{urllib.parse.urlencode({'q': QUERY, 'k': 3})}")
        assert status == 200 and kind.startswith("application/json")
        answer = json.loads(body)
        assert answer["k"] == 3 and answer["offset"] == 0
        hits = answer["hits"]
        assert [hit["rank"] for hit in hits] == [1, 2, 3]
        # The same ranking as the index opened in this process.
        expected = [hit.to_dict() for hit in Index.open(index_dir).search(QUERY, k=3)]
        assert [(h["item_id"], h["key"]) for h in hits] == [(h["item_id"], h["key"]) for h in expected]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-4)
        assert {h["key"] for h in hits} <= {f"p{i}.png" for i in range(6)}

        status, kind, page = _get(f"{base}/")
        assert status == 200 and kind.startswith("text/html") and b"<html" in page.lower()
        with pytest.raises(urllib.error.HTTPError) as refused:  # a bad query is a 400 with a JSON message
            _get(f"{base}/api/search?q=")
        assert refused.value.code == 400 and "empty query" in json.loads(refused.value.read())["detail"]
        assert "serving" in log.read_text()

        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (recent versions) or returns 0.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text() and "Traceback" not in log.read_text()
        with pytest.raises(urllib.error.URLError):
            _get(f"{base}/api/info", timeout=5)  # nothing listens there any more
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
