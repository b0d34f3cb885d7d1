"""Audio inputs: a file, a folder, a manifest with word timings; mono mix-down and resampling; every bad input
(unreadable, empty, a rate that cannot be resampled, longer than the window: a listed skip; timings that do
not fit the clip, a missing file, bad JSON: one error naming the line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnviz.errors import InputError
from extractor.audio import collect_audio, read_audio, resample
from tests.helpers_s2t import tone, write_clip, write_manifest


def collect(path: Path, **kw):
    warnings: list[str] = []
    return collect_audio(path, sample_rate=16000, max_seconds=1.0, warn=warnings.append, **kw), warnings


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    write_clip(root / "b.wav", tone(0.5))
    write_clip(root / "a" / "x.flac", tone(0.4, rate=8000), rate=8000)
    stereo = np.stack([tone(0.3, freq=200), tone(0.3, freq=200) * 0.5], 1)
    write_clip(root / "c.ogg", stereo, subtype="VORBIS")
    (root / "notes.txt").write_text("not audio")
    return root


def test_folder_in_sorted_order_with_durations(folder):
    inputs, warnings = collect(folder)
    assert [it.id for it in inputs.items] == ["a/x.flac", "b.wav", "c.ogg"] and warnings == []
    assert [round(it.duration, 3) for it in inputs.items] == [0.4, 0.5, 0.3]
    assert [it.source_rate for it in inputs.items] == [8000, 16000, 16000]
    assert not inputs.has_labels and inputs.class_names == ()


def test_one_file_and_the_limit(folder):
    inputs, _ = collect(folder / "b.wav")
    assert inputs.ids == ["b.wav"]
    inputs, _ = collect(folder, limit=2)
    assert inputs.ids == ["a/x.flac", "b.wav"]


def test_mono_mixdown_and_resampling_keep_pitch_and_length(folder):
    wave, rate = read_audio(folder / "c.ogg")
    assert wave.ndim == 1 and rate == 16000
    x, rate = read_audio(folder / "a" / "x.flac", 16000)
    assert rate == 16000 and len(x) == 2 * 3200  # 0.4 s at 8 kHz -> 16 kHz
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.fft.rfftfreq(len(x), 1 / 16000)[spectrum.argmax()] - 440) < 5
    y = resample(tone(0.5, rate=22050, freq=1000), 22050, 16000)
    assert len(y) == 8000 and abs(np.fft.rfftfreq(len(y), 1 / 16000)[np.abs(np.fft.rfft(y)).argmax()] - 1000) < 5


def test_bad_clips_are_listed_skips(tmp_path: Path):
    root = tmp_path / "mixed"
    write_clip(root / "good.wav", tone(0.5))
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    write_clip(root / "empty.wav", np.zeros(0, np.float32))
    write_clip(root / "low.wav", tone(0.5, rate=2000, freq=300), rate=2000)
    write_clip(root / "long.wav", tone(1.5))
    inputs, warnings = collect(root)
    assert inputs.ids == ["good.wav"]
    why = dict(inputs.skipped)
    assert set(why) == {"broken.wav", "empty.wav", "low.wav", "long.wav"}
    assert why["broken.wav"].startswith("cannot be read as audio")
    assert "empty" in why["empty.wav"]
    assert "2000 Hz cannot be resampled" in why["low.wav"]
    assert "1.50 s is longer than the model's 1 s window" in why["long.wav"]
    assert len(warnings) == 4 and all(w.startswith("skipped ") for w in warnings)


def test_nothing_usable_is_an_error(tmp_path: Path):
    root = tmp_path / "bad"
    write_clip(root / "long.wav", tone(2.0))
    with pytest.raises(InputError, match="none of the 1 clip"):
        collect(root)
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="holds no audio"):
        collect(tmp_path / "none")
    with pytest.raises(InputError, match="does not exist"):
        collect(tmp_path / "nowhere")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(InputError, match="is not audio"):
        collect(tmp_path / "x.png")


def test_manifest_with_text_and_word_timings(tmp_path: Path):
    write_clip(tmp_path / "a.wav", tone(0.8))
    words = [{"word": "one", "start": 0.1, "end": 0.3}, {"word": "two", "start": 0.35, "end": 0.8}]
    m = write_manifest(tmp_path, [{"audio": "a.wav", "text": "one two", "words": words}, {"audio": "a.wav"}])
    inputs, _ = collect(m)
    first, second = inputs.items
    assert first.text == "one two" and [(w.word, w.start, w.end) for w in first.words] == [("one", 0.1, 0.3),
                                                                                           ("two", 0.35, 0.8)]
    assert second.text is None and second.words is None
    (tmp_path / "m.csv").write_text("audio,text\na.wav,one two\n")
    inputs, _ = collect(tmp_path / "m.csv")
    assert inputs.items[0].text == "one two"


@pytest.mark.parametrize("row,match", [
    ({"audio": "a.wav", "words": [{"word": "one", "start": 0.1, "end": 0.95}]}, "ends at 0.95 s but the clip is 0.800 s"),
    ({"audio": "a.wav", "words": [{"word": "one", "start": 0.3, "end": 0.2}]}, "need 0 <= start < end"),
    ({"audio": "a.wav", "words": [{"word": "one", "start": 0.1, "end": 0.4},
                                  {"word": "two", "start": 0.3, "end": 0.6}]}, "before the previous word ends"),
    ({"audio": "a.wav", "words": [{"word": "one", "start": "soon", "end": 0.4}]}, "numeric 'start' and 'end'"),
    ({"audio": "a.wav", "words": "one two"}, "'words' must be a list"),
    ({"audio": "gone.wav"}, "audio gone.wav not found"),
    ({"text": "no audio"}, "no 'audio' path"),
])
def test_manifest_mistakes_name_the_line(tmp_path: Path, row, match):
    write_clip(tmp_path / "a.wav", tone(0.8))
    m = write_manifest(tmp_path, [{"audio": "a.wav"}, row])
    with pytest.raises(InputError, match="line 2") as e:
        collect(m)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_manifest_that_is_not_json(tmp_path: Path):
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav"\n')
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        collect(tmp_path / "m.jsonl")
    (tmp_path / "n.csv").write_text("image\na.png\n")
    with pytest.raises(InputError, match="must name an 'audio' column"):
        collect(tmp_path / "n.csv")
