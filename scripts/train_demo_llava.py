"""Train the attnviz vision-language demo: a tiny LLaVA that answers questions about the shapes images.

Writes to ``--out`` (default ``sample_data/models/shapes-llava/``), everything ``attnviz extract`` reads:
    config.json, model.safetensors, generation_config.json
        a ``LlavaForConditionalGeneration`` (transformers 5.x): a CLIP-style vision tower (48x48 input,
        patch 12: a 4x4 grid + CLS), a two-layer GELU projector, a Llama-style language model; greedy
        ``generate`` stops at ``</s>``
    processor_config.json, chat_template.jinja, tokenizer.json, tokenizer_config.json
        the ``LlavaProcessor``: ``CLIPImageProcessorPil`` (resize the short side to 48, centre-crop 48x48,
        CLIP normalisation), a ``tokenizers`` WordLevel tokenizer over the 36 words of
        ``shapes_vqa.vocabulary()`` (read by ``AutoProcessor``/``AutoTokenizer.from_pretrained(dir)``
        offline) and the chat template ``user: <image> {question} assistant:``; the processor expands
        ``<image>`` into the 16 image tokens the projector fills (CLS dropped: the "default" strategy)
    training_report.json
        seeds, config, data sizes, per-stage history, answer accuracy per question type, timing, bytes

Training (CPU, fixed seeds, two stages, each resumable):

1. **vision tower** (``--vision-epochs``): the tower alone, with auxiliary heads that are not saved: the
   target's shape, colour and quadrant from the mean of the patch features (the features the projector
   reads), and per patch whether it lies on the target (binary cross-entropy on the mask fraction > 0.3).
   The environment notes measured that a LLaVA trained end to end from scratch learns colour in two
   minutes but shape only to 45% after eight: starting the tower from a trained image model is the lever,
   and this stage trains that image model.
2. **VQA** (``--vqa-epochs``): the whole LLaVA on one random question for each of ``--vqa-per-epoch`` random
   training images per epoch, loss on the answer tokens and ``</s>`` only; the tower at a lower learning rate
   than the projector and language model, both decayed along a cosine over the stage.

Data (``scripts/shapes.py`` through ``scripts/shapes_vqa.py``): train ``make_shapes(n_train, seed=0)``,
test seed 1 (every answerable question type of every test image, random phrasings); the demo recording
(``build_demo_vqa.py``) uses seed 2. Answer accuracy = the greedy ``generate`` output (up to ``</s>``)
equals the reference answer exactly.

Resumable: after every epoch the weights (safetensors), optimizer state and RNG state
(``torch.save``; read back with ``weights_only=True``) and the history go to ``--checkpoint-dir``;
``--resume`` continues from the last finished epoch.

Usage: ``python scripts/train_demo_llava.py [--threads 2] [--resume] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes import CLASS_NAMES, TEST_SEED, TRAIN_SEED, make_shapes  # noqa: E402
from shapes_vqa import (  # noqa: E402
    COLOUR_NAMES,
    POSITION_NAMES,
    QUESTION_TYPES,
    SPECIAL_TOKENS,
    colour_names,
    make_questions,
    positions,
    vocabulary,
)

DEFAULT_OUT = HERE.parent / "sample_data" / "models" / "shapes-llava"
DEFAULT_CHECKPOINTS = Path(tempfile.gettempdir()) / "attnviz-shapes-llava-ckpt"
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
IMAGE_SIZE, PATCH = 48, 12
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the chat template: a user turn with the image then the question, then the assistant's cue
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


# ----------------------------------------------------------------------------- building blocks

def build_tokenizer(words=None):
    """The word-level tokenizer over ``words`` (default :func:`shapes_vqa.vocabulary`; the first five must be
    the special tokens pad, bos, eos, image, unk), lowercased, punctuation split off.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk and the image token ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words or vocabulary())}
    assert [vocab[t] for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID]
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, "?" without
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=64, clean_up_tokenization_spaces=False)


def build_processor(tokenizer, image_size: int = IMAGE_SIZE, patch: int = PATCH):
    """``LlavaProcessor``: the CLIP image processor (PIL backend: no torchvision needed), the tokenizer,
    the chat template; one image becomes ``(48 // 12) ** 2 = 16`` image tokens (CLS not projected)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                   do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_config(args):
    """``LlavaConfig`` of the demo: CLIP-style tower + Llama-style language model, ids < vocab size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.heads,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=args.vision_hidden)
    text = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=args.text_hidden,
                       intermediate_size=3 * args.text_hidden, num_hidden_layers=args.text_layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=64,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)


def prompt_ids(processor, question: str) -> list[int]:
    """Token ids of the templated prompt with the image placeholder expanded to the 16 image tokens (what
    ``processor(text=..., images=...)`` makes; checked once against it in :func:`main`)."""
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                         add_generation_prompt=True)
    text = text.replace("<image>", "<image>" * N_IMAGE_TOKENS)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def pixel_values(processor, images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """uint8 ``(n, h, w, 3)`` -> float32 ``(n, 3, 48, 48)`` through the saved image processor."""
    from PIL import Image

    out = []
    for i in range(0, len(images), chunk):
        ims = [Image.fromarray(x) for x in images[i:i + chunk]]
        out.append(processor.image_processor(ims, return_tensors="np")["pixel_values"].astype(np.float32))
    return np.concatenate(out)


def patch_targets(masks: np.ndarray) -> np.ndarray:
    """Per patch: is more than 30% of it on the target? bool masks ``(n, h, w)`` (resized to the model's
    48x48 crop exactly as the image processor resizes: short side to 48, centre crop) -> float32 ``(n, 16)``."""
    from PIL import Image

    n = len(masks)
    out = np.zeros((n, N_IMAGE_TOKENS), np.float32)
    g = IMAGE_SIZE // PATCH
    for i, m in enumerate(masks):
        im = Image.fromarray(m.astype(np.uint8) * 255)
        h, w = m.shape
        s = IMAGE_SIZE / min(h, w)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
        left, top = (im.width - IMAGE_SIZE) // 2, (im.height - IMAGE_SIZE) // 2
        a = np.asarray(im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)), np.float32) / 255.0
        out[i] = (a.reshape(g, PATCH, g, PATCH).mean((1, 3)) > 0.3).reshape(-1)
    return out


def make_split(n: int, seed: int, processor) -> dict:
    """One split: pixel values, per-patch targets, and the class/colour/quadrant index of every target
    (-1 where ``shapes_vqa`` leaves it unnamed)."""
    data = make_shapes(n, seed)
    colours = [COLOUR_NAMES.index(c) if c else -1 for c in colour_names(data)]
    places = [POSITION_NAMES.index(p) if p else -1 for p in positions(data)]
    return {"data": data, "pixels": pixel_values(processor, data.images), "patches": patch_targets(data.masks),
            "shape": data.labels.astype(np.int64), "colour": np.array(colours, np.int64),
            "position": np.array(places, np.int64)}


# ----------------------------------------------------------------------------- stage 1: the tower

def tower_features(model, px):
    """Patch features the projector reads: the tower's selected layer without CLS ``[b, 16, dim]``."""
    out = model.model.vision_tower(px, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def make_heads(dim: int):
    import torch

    return torch.nn.ModuleDict({"shape": torch.nn.Linear(dim, len(CLASS_NAMES)),
                                "colour": torch.nn.Linear(dim, len(COLOUR_NAMES)),
                                "position": torch.nn.Linear(dim, len(POSITION_NAMES)),
                                "patch": torch.nn.Linear(dim, 1)})


def tower_loss(model, heads, batch):
    """Sum of the auxiliary losses on one batch and the shape accuracy."""
    import torch.nn.functional as F

    feats = tower_features(model, batch["pixels"])
    pooled = feats.mean(1)
    loss = F.binary_cross_entropy_with_logits(heads["patch"](feats).squeeze(-1), batch["patches"])
    for key in ("shape", "colour", "position"):
        target = batch[key]
        if (target >= 0).any():
            loss = loss + F.cross_entropy(heads[key](pooled), target, ignore_index=-1)
    acc = (heads["shape"](pooled).argmax(-1) == batch["shape"]).float().mean()
    return loss, float(acc)


def tower_accuracy(model, heads, split: dict, batch: int = 500) -> dict:
    import torch

    hits = {k: [0, 0] for k in ("shape", "colour", "position")}
    with torch.no_grad():
        for i in range(0, len(split["shape"]), batch):
            px = torch.from_numpy(split["pixels"][i:i + batch])
            pooled = tower_features(model, px).mean(1)
            for k in hits:
                t = torch.from_numpy(split[k][i:i + batch])
                ok = t >= 0
                hits[k][0] += int((heads[k](pooled).argmax(-1)[ok] == t[ok]).sum())
                hits[k][1] += int(ok.sum())
    return {k: h / max(n, 1) for k, (h, n) in hits.items()}


# ----------------------------------------------------------------------------- stage 2: VQA

def encode_questions(processor, questions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forcing batches: input ids (prompt + answer + eos, right-padded), labels (-100 on the
    prompt and padding) and image indices. int64 ``(n, width)``, ``(n, width)``, ``(n,)``."""
    tok = processor.tokenizer
    rows, labels = [], []
    cache: dict[str, list[int]] = {}
    for q in questions:
        p = cache.setdefault(q.prompt, prompt_ids(processor, q.prompt))
        a = tok(q.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    lab = np.full((len(rows), width), -100, np.int64)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = r
        lab[i, :len(l)] = l
    return ids, lab, np.array([q.index for q in questions], np.int64)


def answer_questions(model, processor, split: dict, questions, batch: int = 256, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers through ``model.generate`` with left-padded prompts (what a user runs)."""
    import torch

    tok = processor.tokenizer
    out: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(questions), batch):
            qs = questions[i:i + batch]
            prompts = [prompt_ids(processor, q.prompt) for q in qs]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(qs), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(qs), width), dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            px = torch.from_numpy(split["pixels"][[q.index for q in qs]])
            gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
            for row in gen[:, width:].tolist():
                row = row[:row.index(EOS_ID)] if EOS_ID in row else row
                out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def vqa_accuracy(model, processor, split: dict, questions) -> dict:
    """Exact-match answer accuracy per question type and overall."""
    answers = answer_questions(model, processor, split, questions)
    res: dict = {}
    for kind in QUESTION_TYPES:
        pairs = [(a, q.answer) for a, q in zip(answers, questions) if q.kind == kind]
        res[kind] = {"accuracy": float(np.mean([a == b for a, b in pairs])) if pairs else None, "n": len(pairs)}
    res["overall"] = {"accuracy": float(np.mean([a == q.answer for a, q in zip(answers, questions)])),
                      "n": len(questions)}
    return res


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt: Path, model, heads, optimizer, state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(ckpt / "heads.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(ckpt: Path, model, heads) -> tuple[dict, dict] | None:
    import torch
    from safetensors.torch import load_file

    if not (ckpt / "state.json").is_file():
        return None
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    heads.load_state_dict(load_file(str(ckpt / "heads.safetensors")))
    extra = torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.set_rng_state(extra["torch_rng"])
    return json.loads((ckpt / "state.json").read_text()), extra["optimizer"]


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINTS)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--vision-epochs", type=int, default=8)
    ap.add_argument("--vqa-epochs", type=int, default=8)
    ap.add_argument("--vqa-per-epoch", type=int, default=6000, help="questions per VQA epoch (one per image of a "
                    "random subset of the training images)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-questions", type=int, default=300, help="test questions scored after each VQA epoch "
                    "(all of them at the end)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tower-lr", type=float, default=3e-4, help="learning rate of the tower in the VQA stage")
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded 2-core machine)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(args)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    heads = make_heads(args.vision_hidden)

    t0 = time.perf_counter()
    train = make_split(args.n_train, TRAIN_SEED, processor)
    test = make_split(args.n_test, TEST_SEED, processor)
    test_questions = make_questions(test["data"], seed=TEST_SEED, per_image=3)
    data_seconds = time.perf_counter() - t0
    # the training path builds prompts by hand: it must equal what the processor makes for a recording
    from PIL import Image

    probe = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]}],
        add_generation_prompt=True)], images=[Image.fromarray(train["data"].images[0])], return_tensors="np")
    assert probe["input_ids"][0].tolist() == prompt_ids(processor, "what shape is it?")
    assert np.allclose(probe["pixel_values"][0], train["pixels"][0])

    state = {"stage": "vision", "epoch": 0, "history": {"vision": [], "vqa": []}, "seconds": 0.0}
    tower_params = list(model.model.vision_tower.parameters())
    opt_vision = torch.optim.AdamW(tower_params + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    other = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt_vqa = torch.optim.AdamW([{"params": tower_params, "lr": args.tower_lr}, {"params": other, "lr": args.lr}],
                                weight_decay=0.01)
    if args.resume:
        loaded = load_checkpoint(args.checkpoint_dir, model, heads)
        if loaded is not None:
            state, opt_state = loaded
            (opt_vision if state["stage"] == "vision" else opt_vqa).load_state_dict(opt_state)
            print(f"resumed at stage {state['stage']}, epoch {state['epoch']}", flush=True)
    rng = np.random.default_rng([args.seed, 7])
    for _ in range(state["epoch"] + (args.vision_epochs if state["stage"] == "vqa" else 0)):
        rng.permutation(args.n_train)  # the same batch orders as an uninterrupted run

    n = args.n_train
    tensors = {k: torch.from_numpy(train[k]) for k in ("pixels", "patches", "shape", "colour", "position")}
    # stage 1: the tower
    while state["stage"] == "vision" and state["epoch"] < args.vision_epochs:
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(n)
        losses = []
        for i in range(0, n, args.batch_size):
            idx = torch.from_numpy(order[i:i + args.batch_size])
            loss, _ = tower_loss(model, heads, {k: v[idx] for k, v in tensors.items()})
            opt_vision.zero_grad()
            loss.backward()
            opt_vision.step()
            losses.append(float(loss.detach()))
        model.eval()
        acc = tower_accuracy(model, heads, test)
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - t0
        state["history"]["vision"].append({"epoch": state["epoch"], "loss": float(np.mean(losses)), "test": acc,
                                           "seconds": round(time.perf_counter() - t0, 1)})
        print(f"vision epoch {state['epoch']}: loss {np.mean(losses):.3f} test {acc} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if state["epoch"] == args.vision_epochs:
            state.update(stage="vqa", epoch=0)
        save_checkpoint(args.checkpoint_dir, model, heads, opt_vision if state["stage"] == "vision" else opt_vqa, state)

    # stage 2: questions and answers
    while state["stage"] == "vqa" and state["epoch"] < args.vqa_epochs:
        t0 = time.perf_counter()
        questions = make_questions(train["data"], seed=int(rng.integers(1 << 31)), per_image=1)
        questions = [questions[i] for i in sorted(rng.permutation(len(questions))[: args.vqa_per_epoch])]
        ids, labels, image_index = encode_questions(processor, questions)
        # cosine decay over the stage: the answers settle instead of swinging from epoch to epoch
        scale = 0.5 * (1 + np.cos(np.pi * state["epoch"] / args.vqa_epochs))
        for group, base in zip(opt_vqa.param_groups, (args.tower_lr, args.lr)):
            group["lr"] = base * scale
        model.train()
        order = rng.permutation(len(questions))
        losses = []
        for i in range(0, len(order), args.batch_size):
            sel = order[i:i + args.batch_size]
            width = int((ids[sel] != PAD_ID).sum(1).max())
            batch_ids = torch.from_numpy(ids[sel, :width])
            out = model(input_ids=batch_ids, attention_mask=(batch_ids != PAD_ID).long(),
                        pixel_values=tensors["pixels"][torch.from_numpy(image_index[sel])],
                        labels=torch.from_numpy(labels[sel, :width]), use_cache=False)
            opt_vqa.zero_grad()
            out.loss.backward()
            opt_vqa.step()
            losses.append(float(out.loss.detach()))
        acc = vqa_accuracy(model, processor, test, test_questions[:args.eval_questions])
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - t0
        state["history"]["vqa"].append({"epoch": state["epoch"], "loss": float(np.mean(losses)),
                                        "test": {k: v["accuracy"] for k, v in acc.items()},
                                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"vqa epoch {state['epoch']}: loss {np.mean(losses):.3f} test "
              f"{ {k: round(v['accuracy'], 3) for k, v in acc.items()} } ({time.perf_counter() - t0:.0f} s)", flush=True)
        save_checkpoint(args.checkpoint_dir, model, heads, opt_vqa, state)

    # the model as users have it: save_pretrained dir + processor + report
    model.eval()
    final = vqa_accuracy(model, processor, test, test_questions)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               max_new_tokens=4, do_sample=False)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "seeds": {"train": TRAIN_SEED, "test": TEST_SEED, "torch": args.seed},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                 if k not in ("out", "checkpoint_dir", "resume")},
        "image": {"input": IMAGE_SIZE, "patch": PATCH, "image_tokens": N_IMAGE_TOKENS},
        "vocabulary": vocabulary(), "parameters": n_params,
        "data": {"n_train_images": args.n_train, "n_test_images": args.n_test, "n_test_questions": len(test_questions),
                 "data_seconds": round(data_seconds, 1)},
        "history": state["history"], "training_seconds": round(state["seconds"], 1),
        "test_answer_accuracy": final,
        "model_bytes": (args.out / "model.safetensors").stat().st_size,
        "torch": torch.__version__, "threads": args.threads,
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"test_answer_accuracy": final, "model_bytes": report["model_bytes"],
                      "training_seconds": report["training_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
