"""The dashboard under damage, through its real HTTP endpoint: every callback that reads the selection is
called with out-of-range selections and on a file that is truncated or replaced while the server runs.
No request may end in a 500; figures say what is wrong; the banner reports a failure; the other files keep
serving."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from attnviz.app import ids
from tests.helpers import make_recording


def _outputs(spec: str) -> list[dict[str, str]]:
    """'..a.figure...b.children..' or 'a.figure' (with '@hash' duplicates) -> [{id, property}]."""
    parts = spec.strip(".").split("...") if spec.startswith("..") else [spec]
    out = []
    for p in parts:
        ident, prop = p.rsplit(".", 1)
        out.append({"id": ident, "property": prop.split("@")[0]})
    return out


def _selection_callbacks(client: Any) -> list[dict[str, Any]]:
    client.get("/")
    deps = client.get("/_dash-dependencies").get_json()
    return [d for d in deps if any(i["id"] == ids.SELECTION for i in d["inputs"]) and not d["clientside_function"]]


def _call(client: Any, dep: dict[str, Any], selection: dict[str, Any]) -> Any:
    outputs = _outputs(dep["output"])
    payload = {
        "output": dep["output"],
        "outputs": outputs if dep["output"].startswith("..") else outputs[0],
        "inputs": [{**i, "value": selection if i["id"] == ids.SELECTION else None} for i in dep["inputs"]],
        "changedPropIds": [f"{ids.SELECTION}.data"],
        "state": [{**s, "value": selection if s["id"] == ids.SELECTION else None} for s in dep["state"]],
    }
    return client.post("/_dash-update-component", data=json.dumps(payload), content_type="application/json")


def _texts(response: Any) -> str:
    return json.dumps(response.get_json()) if response.status_code == 200 else ""


@pytest.fixture()
def served(tmp_path: Path):
    from attnviz.app import create_app

    good = make_recording(tmp_path / "good.h5", n_samples=4)
    victim = make_recording(tmp_path / "victim.h5", n_samples=4)
    app = create_app([good, victim])
    return app.server.test_client(), good, victim


def test_out_of_range_selections_get_a_message_never_a_500(served):
    client, _, _ = served
    deps = _selection_callbacks(client)
    assert len(deps) > 30  # every page's callbacks
    base = {"file": "good.h5", "sample": 0, "layer": 0, "head": 0, "query": None}
    for bad, words in [({"sample": 400}, "sample 400 is out of range"), ({"layer": 99}, "layer 99 is out of range"),
                       ({"head": 12}, "head 12 is out of range"), ({"query": 5000}, "query position 5000"),
                       ({"file": "../../etc/passwd"}, "unknown file")]:
        said = 0
        for dep in deps:
            r = _call(client, dep, {**base, **bad})
            assert r.status_code in (200, 204), (dep["output"], bad, r.status_code, r.data[:300])
            said += words in _texts(r)
        assert said >= 10, (bad, said)  # the figures of every page say it


def test_a_file_damaged_while_serving_shows_the_banner_and_others_keep_serving(served):
    client, good, victim = served
    deps = _selection_callbacks(client)
    sel = {"file": "victim.h5", "sample": 1, "layer": 1, "head": 1, "query": None}
    assert all(_call(client, d, sel).status_code in (200, 204) for d in deps)  # opened and cached
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 3])  # truncated under the server (another size: reopened)
    banner = next(d for d in deps if d["output"].startswith("..attnviz-file-banner"))
    assert "truncated" in _texts(_call(client, banner, sel)) or "damaged" in _texts(_call(client, banner, sel))
    for dep in deps:
        r = _call(client, dep, sel)
        assert r.status_code in (200, 204), (dep["output"], r.status_code, r.data[:300])
    shutil.copyfile(good, victim)  # replaced by another recording
    os.utime(victim, None)
    for dep in deps:
        assert _call(client, dep, sel).status_code in (200, 204), dep["output"]
    victim.unlink()  # deleted
    assert "deleted or moved" in _texts(_call(client, banner, sel))
    good_sel = {**sel, "file": "good.h5"}
    overview = [d for d in deps if d["output"].startswith("overview-") or "overview-" in d["output"]]
    assert overview and all(_call(client, d, good_sel).status_code == 200 for d in overview)


def test_a_callback_that_fails_reports_in_the_banner(served, monkeypatch):
    """Damage found only deep inside a read (a bit flipped in one chunk): the app's on_error handler
    answers with no update and puts one line in the banner (checked with the handler's own output)."""
    from attnviz.app.shell import error_banner_text

    assert "damaged, or was changed while" in error_banner_text(OSError("Can't read data (filter returned failure)"))
    assert "could not be drawn (KeyError" in error_banner_text(KeyError("x"))
    client, _, _ = served
    deps = _selection_callbacks(client)
    from attnviz.app.pages import explorer

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("Can't synchronously read data (filter returned failure during read)")

    monkeypatch.setattr(explorer, "query_overlay", broken)
    dep = next(d for d in deps if d["output"] == "explorer-overlay.figure")
    r = _call(client, dep, {"file": "good.h5", "sample": 0, "layer": 0, "head": 0, "query": None})
    assert r.status_code == 200, r.status_code
    body = r.get_json()
    assert "cannot be read right now" in json.dumps(body.get("sideUpdate", body))
