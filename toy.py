"""The miniature world and its unimodally pretrained toy backbones: eP-ALM end to end on a laptop CPU.

Three tiny procedural worlds, generated on the fly from a seed (no files):
  image: one shape x colour x size x position   -> "a small red circle on the left"
  audio: count x length x pitch x kind of sound  -> "three short high beeps"
  video: a shape x colour moving in a direction  -> "a blue square moves up"
Every combination of attribute values is either "train" or "heldout" (30%, every value still seen in
train), so evaluation measures composition, not memorised samples.

The toy backbones are pretrained on one modality each, like the real ones: a 4-layer OPT on the world's
text only (with its own byte-level BPE), and a ViT, an AST and a TimeSformer trained on media only to
classify attributes (the ImageNet / AudioSet / Kinetics analogue). They are
saved in the official hub layout under toy/ and load through the same `from_pretrained` as the real ones.
`python toy.py` regenerates them all (seeded).

The LM corpus is the lesson of this file: an LM trained on i.i.d. captions reaches the captions' entropy
and never learns to read its context, so no injected token can steer it (measured: 42% held-out attribute
accuracy with ideal media features). Documents here put the attribute words first, in random order, then
`</s>`, then a caption or a question and its answer: later words depend on earlier ones, so the LM learns to
look back and copy, which is what eP-ALM exploits (same measurement: 100%).

References: Shukor et al., eP-ALM (ICCV 2023); karpathy/nanoGPT's shakespeare_char for the spirit.
"""
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

MODALITIES = ("image", "audio", "video")
TOY_DIR = Path(__file__).parent / "toy"
QA_SEPARATOR = " </a> "  # VQA text is "</s> question? </a> answer </s>", as for the real OPT
HELDOUT_FRACTION = 0.3
IMAGE_SIZE, VIDEO_SIZE, NUM_FRAMES = 32, 32, 4
SAMPLE_RATE, CLIP_SECONDS = 16000, 1.0

ATTRIBUTES = {
    "image": {"shape": ["circle", "square", "triangle", "cross"],
              "colour": ["red", "green", "blue", "yellow", "purple"],
              "size": ["small", "big"],
              "position": ["left", "right", "top", "bottom"]},
    "audio": {"count": ["one", "two", "three"],
              "length": ["short", "long"],
              "pitch": ["low", "mid", "high"],
              "kind": ["beep", "chirp", "buzz"]},
    "video": {"shape": ["circle", "square", "triangle", "cross"],
              "colour": ["red", "green", "blue", "yellow", "purple"],
              "direction": ["up", "down", "left", "right"]},
}
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
       "purple": (150, 50, 200)}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")


def attributes(modality: str) -> dict[str, list[str]]:
    _check_modality(modality)
    return {name: list(values) for name, values in ATTRIBUTES[modality].items()}


def combinations(modality: str, split: str) -> list[dict]:
    """The attribute combinations of one split, fixed (seeded by the modality) and the same on every machine.
    "all" is both: the toy encoders pretrain on it, as ImageNet models have seen red buses before COCO."""
    _check_modality(modality)
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split {split!r} is not 'train', 'heldout' or 'all'")
    attrs = ATTRIBUTES[modality]
    every = [dict(zip(attrs, values)) for values in itertools.product(*attrs.values())]
    if split == "all":
        return every
    n_held = round(HELDOUT_FRACTION * len(every))
    rng = np.random.default_rng(MODALITIES.index(modality))
    while True:  # redraw until every value keeps at least one train combination (first draw, in practice)
        order = rng.permutation(len(every))
        held, train = set(order[:n_held].tolist()), [every[i] for i in order[n_held:]]
        if all(any(c[a] == v for c in train) for a, vs in attrs.items() for v in vs):
            break
    return [c for i, c in enumerate(every) if (i in held) == (split == "heldout")]


# ---- language: captions, questions ----

WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _plural(kind: str, count: str) -> str:
    return kind if count == "one" else kind + ("es" if kind.endswith("z") else "s")


def caption(modality: str, combo: dict) -> str:
    _check_modality(modality)
    if modality == "image":
        return f"a {combo['size']} {combo['colour']} {combo['shape']} {WHERE[combo['position']]}"
    if modality == "audio":
        return f"{combo['count']} {combo['length']} {combo['pitch']} {_plural(combo['kind'], combo['count'])}"
    return f"a {combo['colour']} {combo['shape']} moves {combo['direction']}"


def questions(modality: str, combo: dict) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs; each answer is an attribute value that only the media tells."""
    _check_modality(modality)
    c = combo
    if modality == "image":
        return [(f"what colour is the {c['shape']}?", c["colour"]),
                (f"what shape is {WHERE[c['position']]}?", c["shape"]),
                (f"what size is the {c['colour']} {c['shape']}?", c["size"]),
                (f"where is the {c['colour']} {c['shape']}?", c["position"])]
    if modality == "audio":
        return [("how many sounds are there?", c["count"]),
                ("are the sounds short or long?", c["length"]),
                ("what pitch are the sounds?", c["pitch"]),
                ("what kind of sound is it?", c["kind"])]
    return [(f"what colour is the {c['shape']}?", c["colour"]),
            (f"what shape moves {c['direction']}?", c["shape"]),
            (f"which way does the {c['colour']} {c['shape']} move?", c["direction"])]


# ---- media ----

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross: two bars a third as thick as they are long
        w = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _jitter_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in RGB[colour])


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    grey = rng.integers(20, 90)
    noise = rng.normal(0, 8, (size, size, 1)) + grey
    return Image.fromarray(np.clip(np.repeat(noise, 3, axis=2), 0, 255).astype(np.uint8))


def render_image(combo: dict, rng: np.random.Generator) -> Image.Image:
    s = IMAGE_SIZE
    img = _background(s, rng)
    r = s * (0.14 if combo["size"] == "small" else 0.25) * rng.uniform(0.93, 1.07)
    near, far, mid = s * 0.3, s * 0.7, s * 0.5
    cx, cy = {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far)}[combo["position"]]
    cx, cy = cx + rng.uniform(-0.06, 0.06) * s, cy + rng.uniform(-0.06, 0.06) * s
    _draw_shape(ImageDraw.Draw(img), combo["shape"], cx, cy, r, _jitter_colour(combo["colour"], rng))
    return img


PITCH_HZ = {"low": 300.0, "mid": 900.0, "high": 2700.0}
LENGTH_S = {"short": 0.07, "long": 0.2}


def render_audio(combo: dict, rng: np.random.Generator) -> torch.Tensor:
    """A 1 s, 16 kHz mono clip: `count` sounds of one kind separated by silences, over faint noise."""
    n_total = int(SAMPLE_RATE * CLIP_SECONDS)
    wave = rng.normal(0, 0.003, n_total)
    count = ATTRIBUTES["audio"]["count"].index(combo["count"]) + 1
    dur = LENGTH_S[combo["length"]] * rng.uniform(0.85, 1.15)
    n = int(dur * SAMPLE_RATE)
    free = CLIP_SECONDS - count * dur
    gaps = rng.dirichlet(np.ones(count + 1)) * (free - 0.06 * (count - 1)) + np.r_[0, [0.06] * (count - 1), 0]
    f0 = PITCH_HZ[combo["pitch"]] * rng.uniform(0.9, 1.1)
    t = np.arange(n) / SAMPLE_RATE
    ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)  # 5 ms fade in and out: no clicks
    start = 0.0
    for i in range(count):
        start += gaps[i]
        if combo["kind"] == "beep":
            sound = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        elif combo["kind"] == "chirp":  # rises an octave and a half around f0
            f = f0 * np.exp(np.linspace(np.log(0.6), np.log(1.7), n))
            sound = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)
        else:  # buzz: a square wave, rich in harmonics
            sound = 0.6 * np.sign(np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)))
        i0 = int(start * SAMPLE_RATE)
        wave[i0:i0 + n] += rng.uniform(0.3, 0.7) * ramp * sound[: n_total - i0]
        start += dur
    return torch.from_numpy(wave.astype(np.float32))


def render_video(combo: dict, rng: np.random.Generator) -> list[Image.Image]:
    """NUM_FRAMES frames of a shape gliding across about half the frame in one direction."""
    s = VIDEO_SIZE
    bg = _background(s, rng)
    r = s * 0.2 * rng.uniform(0.88, 1.12)
    dx, dy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[combo["direction"]]
    dist = s * rng.uniform(0.45, 0.6)
    x0 = s / 2 - dx * dist / 2 + rng.uniform(-3, 3) * (dx == 0)
    y0 = s / 2 - dy * dist / 2 + rng.uniform(-3, 3) * (dy == 0)
    fill = _jitter_colour(combo["colour"], rng)
    frames = []
    for f in range(NUM_FRAMES):
        frame = bg.copy()
        step = dist * f / (NUM_FRAMES - 1)
        _draw_shape(ImageDraw.Draw(frame), combo["shape"], x0 + dx * step, y0 + dy * step, r, fill)
        frames.append(frame)
    return frames


def render(modality: str, combo: dict, rng: np.random.Generator):
    """image: PIL RGB; audio: 1-D float32 waveform at 16 kHz; video: list of PIL RGB frames."""
    _check_modality(modality)
    return {"image": render_image, "audio": render_audio, "video": render_video}[modality](combo, rng)


def samples(modality: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n items {"media", "combo", "caption", "qa"}; the same (modality, split, n, seed) gives the same items.
    Combinations are drawn in shuffled rounds, so every one of the split appears before any repeats."""
    combos = combinations(modality, split)
    rng = np.random.default_rng([seed, MODALITIES.index(modality), ("train", "heldout", "all").index(split)])
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])[:n]
    out = []
    for i in order:
        combo = combos[i]
        out.append({"media": render(modality, combo, rng), "combo": dict(combo),
                    "caption": caption(modality, combo), "qa": questions(modality, combo)})
    return out


# ---- the LM's text ----

def lm_corpus(n_docs: int = 60000, seed: int = 0) -> list[str]:
    """Pretraining documents of the toy LM, each ending with `</s>` (the tokenizer prepends the BOS `</s>`).

    Most documents are " attribute words in random order</s>caption</s>" or "...</s>question? </a> answer</s>":
    the caption or answer is predictable only by reading the words before it, so the LM must learn to look
    back and copy. The random order makes that lookup by meaning (the colour word, wherever it is) rather
    than by position, which is how one injected token at position 0 can later be read. A fifth are bare
    captions or questions (no context), so the LM also knows the prior, as real text does. All
    combinations appear: held-out combinations are held out of multimodal training, not out of language."""
    rng = np.random.default_rng(seed)
    every = {m: combinations(m, "train") + combinations(m, "heldout") for m in MODALITIES}
    docs = []
    for _ in range(n_docs):
        m = MODALITIES[rng.integers(len(MODALITIES))]
        combo = every[m][rng.integers(len(every[m]))]
        words = list(combo.values())
        context = "".join(" " + words[i] for i in rng.permutation(len(words))) + "</s>"  # " red": the caption's token
        if rng.random() < 0.5:
            text = caption(m, combo)
        else:
            q, a = questions(m, combo)[rng.integers(len(questions(m, combo)))]
            text = q + QA_SEPARATOR + a
        docs.append((context if rng.random() < 0.8 else "") + text + "</s>")
    return docs


def train_tokenizer(docs: list[str], folder: Path, vocab_size: int = 512) -> None:
    """Byte-level BPE like OPT's (GPT-2 bytes, no prefix space), ids <s>=0 <pad>=1 </s>=2 <unk>=3, saved as
    vocab.json + merges.txt. Trained on the text between the `</s>` markers, so no merge crosses one."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    segments = (part for doc in docs for part in doc.split("</s>") if part)
    tokenizer.train_from_iterator(segments, vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(folder))


def encode_docs(tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) ids (the tokenizer's <pad>) and their 0/1 attention mask."""
    ids = [e.ids for e in tokenizer.encode_batch(docs)]
    out = torch.full((len(ids), max(map(len, ids))), tokenizer.token_to_id("<pad>"), dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, row in enumerate(ids):
        out[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return out, mask


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2/OPT initialisation: N(0, 0.02) weights and embeddings, zero biases (PyTorch's defaults give an
    N(0, 1) embedding, whose tied logits start with a loss near 80)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():  # the encoders' position/time embeddings and [CLS] start at zero
        if name.split(".")[-1] in ("pos_embed", "cls_token", "dist_token"):
            nn.init.trunc_normal_(p, 0.0, std)
        if name == "time_embed":  # at 0.02 the frames stay unordered: direction was 55% after 2000 steps, 99.7% at 1.0
            nn.init.normal_(p, 0.0, 1.0)
    return model


def train_lm(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, batch: int = 64, lr: float = 3e-3,
             seed: int = 0, log=print) -> float:
    """Next-token pretraining of the toy OPT on the encoded corpus. Returns the mean loss of the last 100 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    lm.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        rows = torch.randint(len(ids), (batch,), generator=gen)
        x, m = ids[rows], mask[rows]
        T = int(m.sum(1).max())
        x, m = x[:, :T], m[:, :T]
        logits = lm(x, m)
        targets = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps - 1:
            log(f"lm step {step}: loss {np.mean(losses[-100:]):.3f}")
    lm.eval()
    return float(np.mean(losses[-100:]))


# ---- the toy encoders: pretrained on media only, to classify attributes ----

# ours -> the official HF layout (the inverse of encoder_parts.HF_RULES and timesformer.HF_TIMESFORMER_RULES)
TO_HF = [
    (r"^cls_token$", "embeddings.cls_token"), (r"^dist_token$", "embeddings.distillation_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"), (r"^time_embed$", "embeddings.time_embeddings"),
    (r"^patch_embed\.", "embeddings.patch_embeddings.projection."),
    (r"^layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^layers\.(\d+)\.attn\.qkv\.", r"encoder.layer.\1.attention.attention.qkv."),
    (r"^layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.temporal_norm1\.", r"encoder.layer.\1.temporal_layernorm."),
    (r"^layers\.(\d+)\.temporal_attn\.qkv\.", r"encoder.layer.\1.temporal_attention.attention.qkv."),
    (r"^layers\.(\d+)\.temporal_attn\.proj\.", r"encoder.layer.\1.temporal_attention.output.dense."),
    (r"^layers\.(\d+)\.temporal_fc\.", r"encoder.layer.\1.temporal_dense."),
    (r"^norm\.", "layernorm."),
]


def encoder_hf_state(model: nn.Module, split_qkv: bool) -> dict[str, torch.Tensor]:
    """The encoder's weights under HF key names; ViTModel and ASTModel store query/key/value apart."""
    import re

    out = {}
    for key, t in model.state_dict().items():
        for pattern, repl in TO_HF:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            raise KeyError(f"toy encoder parameter {key!r} has no HF name")
        if split_qkv and ".attention.attention.qkv." in key:
            for name, part in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                out[key.replace(".qkv.", f".{name}.")] = part.contiguous()
        else:
            out[key] = t.contiguous()
    return out


ENCODER_COMMON = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256,
                  "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                  "initializer_range": 0.02, "qkv_bias": True}
HF_CONFIGS = {  # config.json of each toy encoder, in the fields of the official checkpoints
    "vit": {"model_type": "vit", "architectures": ["ViTModel"], **ENCODER_COMMON, "layer_norm_eps": 1e-12,
            "image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3, "encoder_stride": 8},
    "ast": {"model_type": "audio-spectrogram-transformer", "architectures": ["ASTModel"], **ENCODER_COMMON,
            "layer_norm_eps": 1e-12, "patch_size": 16, "frequency_stride": 16, "time_stride": 8,
            "max_length": 100, "num_mel_bins": 128},
    "timesformer": {"model_type": "timesformer", "architectures": ["TimesformerModel"], **ENCODER_COMMON,
                    "layer_norm_eps": 1e-6, "image_size": VIDEO_SIZE, "patch_size": 8, "num_channels": 3,
                    "num_frames": NUM_FRAMES, "attention_type": "divided_space_time", "drop_path_rate": 0},
}
PREPROCESSOR_CONFIGS = {
    "vit": {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "ast": {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": SAMPLE_RATE,
            "num_mel_bins": 128, "max_length": 100, "padding_value": 0.0, "return_attention_mask": False,
            "do_normalize": True, "mean": -4.2677393, "std": 4.5689974},
    "timesformer": {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": VIDEO_SIZE}, "do_center_crop": True,
                    "crop_size": {"height": VIDEO_SIZE, "width": VIDEO_SIZE}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.45] * 3,
                    "image_std": [0.225] * 3},
}
ENCODER_OF = {"image": "vit", "audio": "ast", "video": "timesformer"}


def new_encoder(name: str) -> nn.Module:
    """A freshly initialised toy encoder of the project's own architecture, from its HF config."""
    if name == "vit":
        import vit
        return init_weights(vit.ViT(vit.ViTConfig.from_dict(HF_CONFIGS[name])))
    if name == "ast":
        import ast_audio
        return init_weights(ast_audio.AST(ast_audio.ASTConfig.from_dict(HF_CONFIGS[name])))
    import timesformer
    return init_weights(timesformer.TimeSformer(timesformer.TimeSformerConfig.from_dict(HF_CONFIGS[name])))


def media_batch(modality: str, encoder: nn.Module, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> (the encoder's preprocessed input, (N, n_attributes) value indices)."""
    x = encoder.preprocess([it["media"] for it in items])
    attrs = ATTRIBUTES[modality]
    y = torch.tensor([[vs.index(it["combo"][a]) for a, vs in attrs.items()] for it in items])
    return x, y


def train_encoder(modality: str, encoder: nn.Module, n_train: int = 2000, steps: int = 600, batch: int = 64,
                  lr: float = 2e-3, seed: int = 0, log=print) -> dict[str, float]:
    """Classification pretraining: one linear head per attribute on the final [CLS] (the heads are thrown away,
    like ImageNet classifiers), on media of every combination. Trained on the train combinations only, the
    3-layer ViT learnt shape through combination shortcuts (47% on held-out combinations, 83% on fresh media
    of train ones), which would test the toy encoder rather than eP-ALM: held-out combinations are held out of
    everything multimodal instead. n_train > 0: a fixed set of media; 0: fresh media every step.
    Returns the accuracy per attribute on media of held-out combinations."""
    torch.manual_seed(seed)
    if n_train:
        x, y = media_batch(modality, encoder, samples(modality, "all", n_train, seed=seed))
    heads = nn.ModuleList(nn.Linear(encoder.hidden_size, len(vs)) for vs in ATTRIBUTES[modality].values())
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        if n_train:
            rows = torch.randint(len(x), (batch,), generator=gen)
            xb, yb = x[rows], y[rows]
        else:  # fresh media every step
            xb, yb = media_batch(modality, encoder, samples(modality, "all", batch, seed=seed * 1_000_003 + step))
        cls = encoder(xb, last=1)[-1][:, 0]
        loss = sum(F.cross_entropy(head(cls), yb[:, i]) for i, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"{ENCODER_OF[modality]} step {step}: loss {loss.item():.3f}")
    encoder.eval()
    hx, hy = media_batch(modality, encoder, samples(modality, "heldout", 300, seed=seed + 1))
    with torch.no_grad():
        cls = encoder(hx, last=1)[-1][:, 0]
    return {a: (head(cls).argmax(1) == hy[:, i]).float().mean().item()
            for i, (a, head) in enumerate(zip(ATTRIBUTES[modality], heads))}


# ---- saving in the official hub layout, and building everything ----

def encoder_dir(modality: str) -> Path:
    _check_modality(modality)
    return TOY_DIR / ENCODER_OF[modality]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_encoder(name: str, encoder: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", HF_CONFIGS[name])
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIGS[name])
    save_file(encoder_hf_state(encoder, split_qkv=name != "timesformer"), str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def lm_hf_config(vocab_size: int) -> dict:
    return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": vocab_size,
            "hidden_size": 128, "num_hidden_layers": 4, "ffn_dim": 512, "num_attention_heads": 4,
            "max_position_embeddings": 64, "word_embed_proj_dim": 128, "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "activation_function": "relu", "enable_bias": True,
            "layer_norm_elementwise_affine": True, "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0,
            "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
            "tie_word_embeddings": True, "use_cache": True}


def save_lm(lm: nn.Module, folder: Path, vocab_size: int) -> None:
    """config.json + model.safetensors with OPTForCausalLM's keys (model.decoder.*; lm_head tied, not stored)."""
    from safetensors.torch import save_file

    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    state = {}
    for key, t in lm.state_dict().items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] in attn:
            key = ".".join(parts[:2] + ["self_attn"] + parts[2:])
        state["model.decoder." + key] = t.contiguous()
    _write_json(folder / "config.json", lm_hf_config(vocab_size))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_lm(folder: Path, steps: int = 1500, log=print) -> float:
    import opt

    docs = lm_corpus()
    train_tokenizer(docs, folder)
    tokenizer = opt.load_tokenizer(str(folder))
    vocab_size = -(-tokenizer.get_vocab_size() // 8) * 8
    torch.manual_seed(0)
    lm = init_weights(opt.OPT(opt.OPTConfig.from_dict(lm_hf_config(vocab_size))))
    ids, mask = encode_docs(tokenizer, docs)
    loss = train_lm(lm, ids, mask, steps, log=log)
    save_lm(lm, folder, vocab_size)
    _check_reload(opt.OPT, lm, folder, ids[:8], mask[:8])
    return loss


def _check_reload(cls, model: nn.Module, folder: Path, *inputs) -> None:
    """The saved folder, read back through the public from_pretrained, must give the trained model's outputs."""
    loaded = cls.from_pretrained(str(folder))
    with torch.no_grad():
        a, b = model(*inputs), loaded(*inputs)
    a, b = (a[-1], b[-1]) if isinstance(a, list) else (a, b)
    if not torch.allclose(a, b, atol=1e-5):
        raise RuntimeError(f"{folder}: reloaded checkpoint differs from the trained model")


ENCODER_STEPS = {"vit": 2000, "ast": 1000, "timesformer": 1500}


def build_encoder(name: str, folder: Path, log=print) -> dict[str, float]:
    modality = {v: k for k, v in ENCODER_OF.items()}[name]
    encoder = new_encoder(name)
    accuracy = train_encoder(modality, encoder, steps=ENCODER_STEPS[name], n_train=0, log=log)
    save_encoder(name, encoder, folder)
    x, _ = media_batch(modality, encoder, samples(modality, "heldout", 4, seed=99))
    _check_reload(type(encoder), encoder, folder, x)
    return accuracy


def build(which=("lm", "vit", "ast", "timesformer"), log=print) -> None:
    """Train and save the toy backbones (seeded) under toy/; `python toy.py` runs this."""
    for name in which:
        if name not in ("lm", "vit", "ast", "timesformer"):
            raise ValueError(f"toy backbone {name!r} is not one of lm, vit, ast, timesformer")
        t0 = time.time()
        torch.manual_seed(0)
        if name == "lm":
            result = f"final loss {build_lm(TOY_DIR / 'lm', log=log):.3f}"
        else:
            accuracy = build_encoder(name, TOY_DIR / name, log=log)
            result = "held-out accuracy " + ", ".join(f"{a} {100 * v:.1f}%" for a, v in accuracy.items())
        log(f"toy/{name}: {result} ({time.time() - t0:.0f} s)")


# ---- what train.py uses: scoring against the attributes, and the toy preset ----

def chance(modality: str) -> dict[str, float]:
    return {a: 1 / len(vs) for a, vs in attributes(modality).items()}


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalpha() else " " for ch in text.lower()).split()


def _value_in(words: list[str], value: str) -> bool:
    return any(w in (value, value + "s", value + "es") for w in words)  # "beeps", "buzzes"


def attribute_accuracy(modality: str, pairs: list[tuple[dict, str]]) -> dict[str, float]:
    """{"<attribute> accuracy": fraction} over (meta, prediction) pairs, meta = {"combo", ["answer"]}.
    A caption gets an attribute right when it names the true value and no other value of that attribute;
    an answer, when it is the true value (scored only for the attribute its question asks about)."""
    attrs = attributes(modality)
    right, total = {a: 0 for a in attrs}, {a: 0 for a in attrs}
    for meta, pred in pairs:
        words, combo = _words(pred), meta["combo"]
        for a, values in attrs.items():
            if "answer" in meta and meta["answer"] != combo[a]:
                continue
            named = [v for v in values if _value_in(words, v)]
            total[a] += 1
            right[a] += named == [combo[a]]
    out = {f"{a} accuracy": right[a] / total[a] for a in attrs if total[a]}
    if out:
        out["attribute accuracy"] = sum(out.values()) / len(out)
    return out


def train_preset(modality: str, task: str) -> dict:
    """train.py's settings for the miniature world: the [CLS] of the toy encoders' last 2 blocks into layers 1
    and 2 of the 4-layer LM, one connector per level (the last layer reads what layer 2 received; injecting
    the 3 levels into layers 1-3 left image shape at 86% held-out, layers 1-2 gave 96%), on cached features
    (the media never change), no augmentation (a horizontal flip would swap "left" and "right"), high learning
    rates, greedy decoding; the blind control (the same recipe on blanked media) runs after it."""
    _check_modality(modality)
    return {"num_levels": 2, "inject_start": 1, "inject_end": 3, "shared_connector": False,
            "max_iters": 1500, "batch_size": 64, "lr": 1e-2, "prompt_lr": 1e-2, "warmup_iters": 50,
            "augment": False, "cache_features": True, "num_workers": 0, "eval_interval": 500,
            "eval_samples": 0, "num_beams": 1, "max_new_tokens": 16, "toy_train_samples": 4000,
            "toy_eval_samples": 300, "blind_control": True}


# ---- the miniature world as ordinary files: a worked example of `train.py --dataset jsonl` ----

def export(folder, modality: str, task: str = "caption", train_samples: int = 4000, heldout_samples: int = 300,
           seed: int = 1337) -> None:
    """Write the world's training and held-out media as files (PNG 32x32; WAV 16 kHz mono 16-bit; video as a
    folder of frame PNGs, read without PyAV) and their folder/train.jsonl and folder/val.jsonl: the items of
    train.py's toy run (seeds seed and seed + 1, one question per media as data.toy_examples picks it)."""
    import json
    import wave
    _check_modality(modality)
    folder = Path(folder)
    for split, jsonl, n, split_seed in (("train", "train", train_samples, seed),
                                        ("heldout", "val", heldout_samples, seed + 1)):
        (folder / jsonl).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, s in enumerate(samples(modality, split, n, split_seed)):
            name = f"{jsonl}/{i:04d}" + {"image": ".png", "audio": ".wav", "video": ""}[modality]
            if modality == "image":
                s["media"].save(folder / name)
            elif modality == "audio":
                pcm = np.clip(np.round(np.asarray(s["media"]) * 32768), -32768, 32767).astype("<i2")
                with wave.open(str(folder / name), "wb") as w:
                    w.setnchannels(1)
                    w.setsampwidth(2)
                    w.setframerate(SAMPLE_RATE)
                    w.writeframes(pcm.tobytes())
            else:
                (folder / name).mkdir(exist_ok=True)
                for k, frame in enumerate(s["media"]):
                    frame.save(folder / name / f"{k:03d}.png")
            record = {"id": f"{split}-{i}", "media": name}
            if task == "caption":
                record["caption"] = s["caption"]
            else:
                record["question"], record["answer"] = s["qa"][i % len(s["qa"])]
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        (folder / f"{jsonl}.jsonl").write_text("".join(lines), encoding="utf-8")


def export_main(argv: list[str]) -> None:
    """python toy.py --export DIR --modality audio [--task vqa] [--train_samples N] [--heldout_samples N]"""
    import configurator
    preset = train_preset("image", "caption")
    defaults = {"export": "", "modality": "image", "task": "caption", "train_samples": preset["toy_train_samples"],
                "heldout_samples": preset["toy_eval_samples"], "seed": 1337}  # train.py's seed
    args = {**defaults, **configurator.overrides(argv, defaults, export_main.__doc__)}
    if not args["export"]:
        configurator.fail("--export DIR: the folder to write the files to (python toy.py alone rebuilds toy/)")
    if args["modality"] not in MODALITIES or args["task"] not in ("caption", "vqa"):
        configurator.fail(f"--modality {args['modality']} --task {args['task']}: expected image, audio or video, "
                          "and caption or vqa")
    export(args["export"], args["modality"], args["task"], args["train_samples"], args["heldout_samples"],
           args["seed"])
    print(f"wrote {args['export']}/train.jsonl and val.jsonl; train on them with: python train.py --dataset jsonl "
          f"--data_dir {args['export']} --modality {args['modality']}")


if __name__ == "__main__":
    import sys
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if sys.argv[1:]:  # python toy.py --export DIR ...: the world as files
        export_main(sys.argv[1:])
    else:
        build()
