"""A reader opened while a writer appends (another process: an extraction, or ``--resume``) sees a
consistent prefix: every sample it counts as written reads back complete and right."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


import attnviz

ROOT = Path(__file__).resolve().parents[2]
N, BATCH, T = 60, 4, 10

WRITER = f"""
import sys, time
import numpy as np
from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout
out = sys.argv[1]
lay = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(3, 3), patch_size=(8, 8), image_size=(24, 24))
resume = len(sys.argv) > 2
if resume:
    w = RecordingWriter.resume(out)
else:
    w = RecordingWriter.create(out, family="vit", model_name="m", model_class="ViTModel",
                               sample_ids=[f"s{{i}}" for i in range({N})], stacks=[StackSpec("self", 2, 2, {T}, {T}, lay)],
                               class_names=[], thumbnail_shape=(24, 24), batch_size={BATCH})
stop = {N} if resume else {N} // 2
for start, end in w.pending_batches():
    if end > stop:
        break
    b = end - start
    maps = np.zeros((b, 2, 2, {T}, {T}), np.float32)
    for j in range(b):
        maps[j, :, :, :, (start + j) % {T}] = 1.0   # every row of sample s attends to key s % T
    thumbs = np.full((b, 24, 24, 3), 0, np.uint8)
    thumbs[:] = (np.arange(start, end) % 256)[:, None, None, None]
    w.write(SampleBatch(start=start, attention={{"self": maps}}, predictions=np.full(b, -1),
                        logits=np.full((b, 1), np.nan), thumbnails=thumbs))
    w.drain()
    print(end, flush=True)
    time.sleep(0.3)
if resume:
    w.finish()
else:
    w.close()
"""


def _check_prefix(path: Path) -> int:
    with attnviz.open(path) as rec:
        n = rec.n_samples
        for s in range(n):
            assert rec.attention(s, 1, 1)[3].argmax() == s % T, s
            assert int(rec.thumbnail(s)[0, 0, 0]) == s % 256, s
        return n


def test_a_reader_sees_a_consistent_prefix_while_the_writer_appends_and_resumes(tmp_path):
    out = tmp_path / "run.h5"
    part = Path(f"{out}.partial")
    for args in ([str(out)], [str(out), "resume"]):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen = []
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            target = out if out.exists() else part
            if target.exists():
                try:
                    seen.append(_check_prefix(target))
                except attnviz.RecordingError:
                    pass  # the file is still being laid out (before the first flush): not a recording yet
            time.sleep(0.02)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        assert seen, "the reader never opened the file while it was written"
        assert sorted(seen) == seen  # the prefix only grows
        assert all(n % BATCH == 0 for n in seen)  # whole batches, never a half-written one
    assert _check_prefix(out) == N
    assert len(set(seen)) > 2  # it did watch the prefix grow during the resume
