"""Serving the dashboard on waitress (a production WSGI server; Flask's dev server is never used)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Sequence

from attnviz.errors import InputError

__all__ = ["serve", "sample_data_files", "SAMPLE_DATA_DIR"]

SAMPLE_DATA_DIR = Path(__file__).resolve().parents[2] / "sample_data"


#: The recording ``attnviz demo`` opens on.
FIRST_DEMO = "shapes-demo.h5"


def sample_data_files() -> list[Path]:
    """The bundled demo recordings ``sample_data/*.h5``, the image demo first (the dashboard opens on the
    first file, and the Overview is an image page), then the others by name.

    Raises:
        InputError: none there.
    """
    files = sorted(SAMPLE_DATA_DIR.glob("*.h5"), key=lambda p: (p.name != FIRST_DEMO, p.name))
    if not files:
        raise InputError(f"no bundled recordings in {SAMPLE_DATA_DIR}; give recordings: attnviz serve FILE.h5")
    return files


def serve(files: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 8050, workers: int = 4,
          open_message: bool = True) -> None:
    """Serve the dashboard over ``files`` until interrupted.

    Args:
        files: recordings or folders; empty: the bundled sample_data.
        host: interface to bind (127.0.0.1: this machine only).
        port: TCP port.
        workers: waitress worker threads.

    Raises:
        InputError: no files, a missing file, bad workers, or the port is in use.
    """
    if workers < 1:
        raise InputError("--workers must be at least 1")
    paths = list(files) or sample_data_files()
    from waitress.server import create_server

    from attnviz.app.factory import create_app

    app = create_app(paths)
    try:
        server = create_server(app.server, host=host, port=port, threads=workers, ident="attnviz")
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            why = "in use" if e.errno == errno.EADDRINUSE else "not allowed"
            raise InputError(f"port {port} on {host} is {why}: choose another with --port") from None
        if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRNOTAVAIL,):
            raise InputError(f"cannot bind to host {host!r}: {e.strerror or e}") from None
        raise
    if open_message:
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(f"attnviz dashboard on http://{shown}:{port}/  ({len(paths)} file(s), {workers} thread(s); Ctrl+C stops)",
              flush=True)
    try:
        server.run()
    finally:
        server.close()
