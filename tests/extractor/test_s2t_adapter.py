"""The s2t adapter on tiny random Whisper checkpoints of every kind users have (plain like the demo, ``.en``,
multilingual), saved with ``save_pretrained`` and loaded through the real path: the recorded attention equals the
model's own teacher-forced attention (computed here independently), the tokens equal ``generate``'s, the
prompt's language/task tokens are rows, sizes follow the clips, and the family refuses what it does not take."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import attnviz
from attnviz.errors import InputError
from extractor.pipeline import ExtractOptions, extract
from tests.helpers_s2t import save_tiny_whisper, token_ids, tone, write_clip

KINDS = ("plain", "en", "multilingual")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two clips of different lengths (0.55 s and 0.8 s) at 16 kHz and one at 22.05 kHz (resampled)."""
    root = tmp_path_factory.mktemp("clips")
    write_clip(root / "a.wav", tone(0.55, freq=330, seed=1, bursts=((0.1, 0.3),)))
    write_clip(root / "b.wav", tone(0.8, freq=520, seed=2, bursts=((0.05, 0.2), (0.4, 0.7))))
    write_clip(root / "c.flac", tone(0.7, rate=22050, freq=250, seed=3, bursts=((0.2, 0.5),)), rate=22050)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whisper")
    return {k: save_tiny_whisper(root / k, k, seed=i) for i, k in enumerate(KINDS)}


@pytest.fixture(scope="module")
def recordings(models, clips, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rec")
    out = {}
    for kind, model in models.items():
        out[kind] = extract(ExtractOptions(model=str(model), input=str(clips), out=str(root / f"{kind}.h5"),
                                           batch_size=2, attributions=(), progress=False,
                                           family_options={"max_new_tokens": 4})).path
    return out


def _independent(model_dir: Path, wave: np.ndarray, rate: int):
    """The model's own teacher-forced outputs for the tokens generate() makes: (sequence, outputs, features)."""
    import transformers as T
    from scipy.signal import resample_poly

    model = T.WhisperForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    fe = T.WhisperFeatureExtractor.from_pretrained(model_dir)
    if rate != fe.sampling_rate:
        g = math.gcd(rate, fe.sampling_rate)
        wave = resample_poly(wave.astype(np.float64), fe.sampling_rate // g, rate // g).astype(np.float32)
    x = fe([wave], sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
    with torch.no_grad():
        seq = model.generate(x, return_dict_in_generate=True, max_new_tokens=4).sequences[0]
        eos = model.generation_config.eos_token_id
        seq = seq.tolist()
        # everything after the first end-of-text is padding
        for i in range(1, len(seq)):
            if seq[i] == eos and i > 0:
                seq = seq[:i + 1]
                break
        out = model(input_features=x, decoder_input_ids=torch.tensor([seq[:-1]]), output_attentions=True)
    return seq, out, x, len(wave)


@pytest.mark.parametrize("kind", KINDS)
def test_recorded_attention_equals_the_models_own(kind, models, clips, recordings):
    import soundfile as sf

    with attnviz.open(recordings[kind]) as rec:
        assert rec.family == "s2t" and rec.main_kind == "cross" and rec.kinds() == ("cross", "decoder_self", "self")
        ids = rec.sample_ids()
        for s, name in enumerate(ids):
            wave, rate = sf.read(clips / name, dtype="float32")
            seq, out, x, n = _independent(models[kind], wave, rate)
            meta = rec.meta(s)
            assert [seq[0]] + meta["token_ids"] == seq, "tokens differ from the model's own generate()"
            rows = len(seq) - 1
            frames = math.ceil(n / 160)
            enc = math.ceil(frames / 2)
            assert (meta["n_feature_frames"], meta["n_encoder_frames"]) == (frames, enc)
            assert rec.lengths(s, "cross") == (rows, enc)
            assert rec.lengths(s, "self") == (enc, enc) and rec.lengths(s, "decoder_self") == (rows, rows)
            for layer in range(rec.n_layers):
                for h in range(rec.n_heads):
                    ours = rec.attention(s, layer, h, "cross")
                    theirs = out.cross_attentions[layer][0, h, :, :enc].numpy()
                    np.testing.assert_allclose(ours, theirs, atol=2e-3)
                    np.testing.assert_allclose(rec.attention(s, layer, h, "decoder_self"),
                                               out.decoder_attentions[layer][0, h].numpy(), atol=2e-3)
                    np.testing.assert_allclose(rec.attention(s, layer, h, "self"),
                                               out.encoder_attentions[layer][0, h, :enc, :enc].numpy(), atol=2e-3)
            # the stored features are the model's input, cropped to the frames that hold audio (time unchanged)
            np.testing.assert_allclose(rec.per_sample("log_mel", s)[:, :frames], x[0, :, :frames].numpy(), atol=2e-3)
            assert not rec.per_sample("log_mel", s)[:, frames:].any()
            # the padding of the maps is zero (file format)
            full = rec.h5["attention/cross/maps"][s]
            assert not full[:, :, rows:].any() and not full[:, :, :, enc:].any()
            lp = out.logits[0].log_softmax(-1)
            np.testing.assert_allclose(meta["logprob"], lp[torch.arange(rows), torch.tensor(seq[1:])].numpy(), atol=1e-4)


def test_multilingual_prompt_tokens_are_rows(recordings):
    ids = token_ids()
    with attnviz.open(recordings["multilingual"]) as rec:
        meta = rec.meta(0)
        assert meta["prompt_rows"] == 3  # rows 0-2 predict the language, the task and <|notimestamps|>
        assert meta["tokens"][0] in ("<|en|>", "<|de|>")  # detected
        assert meta["token_ids"][1:3] == [ids["<|transcribe|>"], ids["<|notimestamps|>"]]
        assert meta["special"][:3] == [True, True, True] and meta["decoder_start"] == "<|startoftranscript|>"
        assert rec.extraction_params["family"]["model_alignment_heads"] == [[1, 0], [1, 1]]
    with attnviz.open(recordings["en"]) as rec:
        meta = rec.meta(0)
        assert meta["prompt_rows"] == 1 and meta["token_ids"][0] == ids["<|notimestamps|>"]
    with attnviz.open(recordings["plain"]) as rec:
        assert rec.meta(0)["prompt_rows"] == 0


def test_language_and_task_are_forced(models, clips, tmp_path):
    ids = token_ids()
    out = extract(ExtractOptions(model=str(models["multilingual"]), input=str(clips / "a.wav"), out=str(tmp_path / "de.h5"),
                                 attributions=(), progress=False,
                                 family_options={"language": "de", "task": "translate", "max_new_tokens": 2})).path
    with attnviz.open(out) as rec:
        assert rec.meta(0)["token_ids"][:3] == [ids["<|de|>"], ids["<|translate|>"], ids["<|notimestamps|>"]]
    with pytest.raises(InputError, match="English-only"):
        extract(ExtractOptions(model=str(models["en"]), input=str(clips / "a.wav"), out=str(tmp_path / "x.h5"),
                               attributions=(), progress=False, family_options={"language": "de"}))
    with pytest.raises(InputError, match="not a language of this model"):
        extract(ExtractOptions(model=str(models["multilingual"]), input=str(clips / "a.wav"),
                               out=str(tmp_path / "y.h5"), attributions=(), progress=False,
                               family_options={"language": "fr"}))


def test_beam_search_records_the_best_beam(models, clips, tmp_path):
    import transformers as T

    out = extract(ExtractOptions(model=str(models["plain"]), input=str(clips / "b.wav"), out=str(tmp_path / "beam.h5"),
                                 attributions=(), progress=False, family_options={"beam": 3, "max_new_tokens": 4})).path
    import soundfile as sf

    wave, _ = sf.read(clips / "b.wav", dtype="float32")
    model = T.WhisperForConditionalGeneration.from_pretrained(models["plain"], attn_implementation="eager").eval()
    x = T.WhisperFeatureExtractor.from_pretrained(models["plain"])([wave], sampling_rate=16000,
                                                                    return_tensors="pt").input_features
    with torch.no_grad():
        seq = model.generate(x, return_dict_in_generate=True, max_new_tokens=4, num_beams=3).sequences[0].tolist()
    with attnviz.open(out) as rec:
        got = rec.meta(0)["token_ids"]
        assert got == seq[1:1 + len(got)] and rec.extraction_params["family"]["beam"] == 3


def test_stacks_are_sized_from_the_clips_and_the_token_budget(recordings):
    with attnviz.open(recordings["multilingual"]) as rec:
        # the longest clip: 0.8 s = 12,800 samples -> 80 feature frames -> 40 encoder frames
        assert rec.h5["attention/cross/maps"].shape[-1] == 40
        assert rec.h5["per_sample/log_mel"].shape[-1] == 80
        # prompt bound 4 (start, language, task, <|notimestamps|>) + 4 new tokens - 1 = 7 rows
        assert rec.h5["attention/cross/maps"].shape[-2] == 7
        fam = rec.extraction_params["family"]
        assert fam["encoder_frame_seconds"] == 0.02 and fam["window_seconds"] == 1.0
        env = rec.per_sample("waveform_envelope", 1)
        assert env.shape[0] == 2 and (env[0] <= env[1]).all()


def test_options_the_family_does_not_take_are_refused(models, clips, tmp_path):
    base = dict(model=str(models["plain"]), input=str(clips), out=str(tmp_path / "r.h5"), progress=False)
    cases = [
        (dict(image_size=(32, 32)), "--image-size does not apply to a speech model"),
        (dict(store_qk=0.5), "--store-qk does not apply to a s2t model"),
        (dict(family_options={"n_heads": 3}), "do not apply to a speech"),
        (dict(family_options={"n_masks": 0}), "--n-masks must be at least 1"),
        (dict(family_options={"beam": "two"}), "--beam must be an integer"),
        (dict(family_options={"stacks": "cross,vision"}), "unknown attention kind"),
        (dict(family_options={"alignment_heads": "5:0"}), "not a decoder head"),
        (dict(family_options={"gradient_method": "gradcam"}), "--gradient-method must be one of"),
        (dict(target="label"), "leave --target at auto"),
        (dict(attributions=("saliency",)), "do not apply to audio inputs"),
        (dict(family_options={"max_new_tokens": 100}), "must fit the decoder"),
    ]
    for kw, match in cases:
        with pytest.raises(InputError, match=match):
            extract(ExtractOptions(**{**base, **kw}))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_vit_model_refuses_speech_options(tmp_path):
    from tests.helpers import save_tiny_model, write_images

    model = save_tiny_model(tmp_path / "vit", "vit")
    write_images(tmp_path / "imgs", ["a.png"])
    with pytest.raises(InputError, match="beam do not apply to a vit model"):
        extract(ExtractOptions(model=str(model), input=str(tmp_path / "imgs"), out=str(tmp_path / "r.h5"),
                               progress=False, family_options={"beam": 2}))


def test_a_burst_at_t_seconds_stays_at_t_after_cropping_and_pooling(models, tmp_path):
    """A tone burst at [0.50, 0.56) s: the recorded (cropped) features peak there, and so do they pooled to
    encoder frames; the cross-attention's frame axis is the same (cropping keeps index = time)."""
    from attnviz.analysis.crossattn import pool_frames

    wave = tone(0.9, freq=1500, bursts=((0.50, 0.56),)) + 1e-4 * np.random.default_rng(0).standard_normal(14400)
    write_clip(tmp_path / "burst.wav", wave.astype(np.float32))
    out = extract(ExtractOptions(model=str(models["plain"]), input=str(tmp_path / "burst.wav"),
                                 out=str(tmp_path / "burst.h5"), attributions=(), progress=False,
                                 family_options={"max_new_tokens": 2})).path
    with attnviz.open(out) as rec:
        meta = rec.meta(0)
        f, e = meta["n_feature_frames"], meta["n_encoder_frames"]
        energy = rec.per_sample("log_mel", 0)[:, :f].astype(np.float64).mean(0)
        j = int(energy.argmax())
        assert 0.49 <= (j + 0.5) * 0.01 <= 0.57
        k = int(pool_frames(energy[None], "max")[0].argmax())
        assert 0.48 <= (k + 0.5) * 0.02 <= 0.58 and rec.lengths(0, "cross")[1] == e == 45


def test_a_cached_hub_id_loads_with_its_feature_extractor_and_tokenizer(models, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as C

    from extractor.adapters import load_model

    repo = tmp_path / "cache" / "models--openai--whisper-tiny-test"
    rev = "1" * 40
    shutil.copytree(models["multilingual"], repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = load_model("openai/whisper-tiny-test", family="s2t", device="cpu")
    assert adapter.source.from_cache and adapter.name == "s2t" and adapter.sample_rate == 16000
    assert adapter.model_alignment_heads == ((1, 0), (1, 1)) and adapter.prompt_max == 4


def test_a_folder_without_feature_extractor_or_tokenizer_is_one_error(models, tmp_path):
    import shutil

    from attnviz.errors import ModelError
    from extractor.adapters import load_model

    d = tmp_path / "nofe"
    shutil.copytree(models["plain"], d)
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="no preprocessor_config.json"):
        load_model(d, device="cpu")
    d = tmp_path / "notok"
    shutil.copytree(models["plain"], d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        load_model(d, device="cpu")
