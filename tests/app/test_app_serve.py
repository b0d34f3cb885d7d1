"""`attnviz serve` / `attnviz demo` as a user runs them: waitress, 127.0.0.1, one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from attnviz.errors import InputError

CODE = "import sys; from attnviz.cli import main; main(sys.argv[1:])"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_on_waitress_bound_to_localhost(rec_path):
    import psutil

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", CODE, "serve", str(rec_path), "--port", str(port), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    body, server = r.read().decode(), r.headers.get("Server")
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"server did not come up: {proc.stderr.read() if proc.poll() is not None else ''}")
                time.sleep(0.3)
        assert server == "attnviz"  # waitress with our ident, not Werkzeug's development server
        assert "attnviz" in body and "_dash-config" in body
        assert '"ui":false' in body and '"props_check":false' in body  # Dash dev tools (debug mode) off
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening and all(a.ip == "127.0.0.1" for a in listening)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_port_in_use_is_one_line_and_exit_2(rec_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", CODE, "serve", str(rec_path), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"error: port {port} on 127.0.0.1 is in use: choose another with --port\n"


def test_missing_file_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", CODE, "serve", str(tmp_path / "nope.h5")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr


def test_sample_data_is_the_default(monkeypatch, tmp_path, rec_path):
    from attnviz.app import server

    monkeypatch.setattr(server, "SAMPLE_DATA_DIR", tmp_path / "empty")
    with pytest.raises(InputError, match="no bundled recordings"):
        server.sample_data_files()
    monkeypatch.setattr(server, "SAMPLE_DATA_DIR", rec_path.parent)
    assert server.sample_data_files() == [rec_path]


def test_the_demo_opens_on_the_image_recording():
    from attnviz.app import server

    files = [p.name for p in server.sample_data_files()]
    assert files[0] == "shapes-demo.h5"  # the Overview, the first page, is an image page
    assert sorted(files[1:]) == files[1:] and {"digits-demo.h5", "shapes-vqa.h5"} <= set(files)
