"""The spoken-digit generator (``scripts/speech_digits.py``) and the pure helpers of the demo Whisper
trainer (``scripts/train_demo_whisper.py``).

Synthesis needs the ``espeak-ng`` executable, which CI does not install (yet): those tests skip
when it is not on PATH. The trainer's helpers (WER alignment, labels, tokenizer) run everywhere.
The check of the shipped model (``sample_data/models/digits-whisper``) is marked ``slow`` (~10 s).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import speech_digits as sd  # noqa: E402
import train_demo_whisper as tw  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")
SHIPPED = SCRIPTS.parent / "sample_data" / "models" / "digits-whisper"


@pytest.fixture(scope="module")
def clips():
    return sd.make_digit_clips(12, seed=7)


@needs_espeak
def test_deterministic_for_a_seed(clips):
    again = sd.make_digit_clips(12, seed=7, workers=1)   # worker count must not matter
    for a, b in zip(clips, again):
        assert np.array_equal(a.waveform, b.waveform)
        assert (a.text, a.tokens, a.words, a.voice) == (b.text, b.tokens, b.words, b.voice)
    other = sd.make_digit_clips(12, seed=8)
    assert [c.text for c in other] != [c.text for c in clips]


@needs_espeak
def test_clip_fields_are_consistent(clips):
    for c in clips:
        assert c.waveform.dtype == np.float32 and c.waveform.ndim == 1
        assert 0 < c.duration <= 3.0
        assert 1 <= len(c.tokens) <= 5
        names = [sd.DIGIT_WORDS[t] for t in c.tokens]
        assert c.text == " ".join(names) == " ".join(w.word for w in c.words)
        assert np.isclose(np.abs(c.waveform).max(), c.gain)
        starts = [w.start for w in c.words]
        assert starts == sorted(starts)


@needs_espeak
def test_word_timings_match_the_audio(clips):
    gap_min = int(0.05 * sd.SAMPLE_RATE) - 1
    for c in clips:
        x = c.waveform
        inside = np.zeros(len(x), bool)
        for (s, e), w in zip(c.word_samples, c.words):
            assert (s / sd.SAMPLE_RATE, e / sd.SAMPLE_RATE) == (w.start, w.end)
            word = np.abs(x[s:e])
            # edges are exact: the first/last sample of a span reach 2% of the word's peak ...
            assert word[0] >= 0.02 * word.max() * 0.999 and word[-1] >= 0.02 * word.max() * 0.999
            # ... and the gaps around it are at least 50 ms of silence
            assert s >= gap_min and not x[s - gap_min:s].any() and not x[e:e + gap_min].any()
            assert np.sqrt(np.mean(x[s:e] ** 2)) > 0.01 * c.gain
            inside[s:e] = True
        assert not x[~inside].any()                        # everything outside the words is silence


@needs_espeak
def test_all_voices_differ():
    sounds = {sd.synthesize_word("seven", v, 160, 50).tobytes() for v in sd.VOICES}
    assert len(sounds) == len(sd.VOICES)


@needs_espeak
def test_write_split_manifest(clips, tmp_path):
    sf = pytest.importorskip("soundfile")
    manifest = sd.write_split(clips[:4], tmp_path / "demo")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 4
    for row, c in zip(rows, clips):
        assert set(row) == {"audio", "text", "words"}
        assert row["audio"] == f"clips/{rows.index(row):04d}.wav"
        audio, rate = sf.read(manifest.parent / row["audio"], dtype="float32")
        info = sf.info(manifest.parent / row["audio"])
        assert rate == 16000 and info.subtype == "PCM_16" and info.channels == 1
        assert len(audio) == len(c.waveform)
        assert np.abs(audio - c.waveform).max() < 1e-4     # 16-bit quantisation only
        assert row["text"] == c.text
        assert [w["word"] for w in row["words"]] == [w.word for w in c.words]
        for w, span in zip(row["words"], c.words):
            assert abs(w["start"] - span.start) <= 5e-5 and abs(w["end"] - span.end) <= 5e-5


def test_edit_ops_counts_substitutions_deletions_insertions():
    assert tw.edit_ops([1, 2, 3], [1, 2, 3]) == (0, 0, 0)
    assert tw.edit_ops([1, 2, 3], [1, 5, 3]) == (1, 0, 0)
    assert tw.edit_ops([1, 2, 3], [1, 3]) == (0, 1, 0)
    assert tw.edit_ops([1, 2], [1, 2, 2]) == (0, 0, 1)
    assert tw.edit_ops([], [4, 4]) == (0, 0, 2)
    assert sum(tw.edit_ops([7, 1, 2, 3], [1, 2, 9, 3, 4])) == 3
    s = tw.score([[1, 2, 3], [4]], [[1, 2, 3], [5, 6]])
    assert s["exact_sequence_accuracy"] == 0.5 and s["wer"] == 2 / 4


def test_labels_and_decoding():
    labels = tw.make_labels([[3, 9], [1]])
    assert labels.tolist() == [[3, 9, tw.EOS_ID], [1, tw.EOS_ID, -100]]
    assert tw.decode_digits([tw.START_ID, 3, 9, tw.EOS_ID, tw.PAD_ID, 4]) == [3, 9]


def test_tokenizer_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    tw.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == tw.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (tw.PAD_ID, tw.START_ID, tw.EOS_ID)
    assert tok("three nine one").input_ids == [3, 9, 1]
    ids = [tw.START_ID, 3, 9, 1, tw.EOS_ID, tw.PAD_ID]
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<|startoftranscript|>", "three", "nine"]
    assert tok.decode(ids, skip_special_tokens=True) == "three nine one"


@pytest.mark.slow
@needs_espeak
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="demo model not built")
def test_shipped_model_transcribes_demo_clips():
    torch = pytest.importorskip("torch")
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    clips = sd.make_digit_clips(16, seed=sd.DEMO_SEED)
    fe = AutoFeatureExtractor.from_pretrained(SHIPPED)
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    model = WhisperForConditionalGeneration.from_pretrained(SHIPPED).eval()
    feats = fe([c.waveform for c in clips], sampling_rate=16000, return_tensors="pt").input_features
    assert tuple(feats.shape) == (16, 80, 2 * model.config.max_source_positions)
    with torch.no_grad():
        texts = tok.batch_decode(model.generate(feats), skip_special_tokens=True)
    assert np.mean([t == c.text for t, c in zip(texts, clips)]) >= 0.8
