"""The miniature world: eP-ALM end to end on a laptop CPU.

Three tiny procedural worlds, generated on the fly from a seed (no files):
  image: one shape x colour x size x position   -> "a small red circle on the left"
  audio: count x length x pitch x kind of sound  -> "three short high beeps"
  video: a shape x colour moving in a direction  -> "a blue square moves up"
Every combination of attribute values is either "train" or "heldout" (30%, every value still seen in
train), so evaluation measures composition, not memorised samples. Captions and answers are scored by the
attribute values they name (attribute_accuracy); train_preset() holds train.py's settings for this world.

Its backbones, each pretrained on one modality, are built and saved under toy/ by toy_pretrain.py;
`python toy.py` rebuilds them too.

References: Shukor et al., eP-ALM (ICCV 2023); karpathy/nanoGPT's shakespeare_char for the spirit.
"""
import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fbank import AST_SAMPLE_RATE
from media import MODALITIES

TOY_DIR = Path(__file__).parent / "toy"
ENCODER_OF = {"image": "vit", "audio": "ast", "video": "timesformer"}  # the toy backbone of each modality
QA_SEPARATOR = " </a> "  # VQA text is "</s> question? </a> answer </s>", as for the real OPT
HELDOUT_FRACTION = 0.3
IMAGE_SIZE, VIDEO_SIZE, NUM_FRAMES = 32, 32, 4
SAMPLE_RATE, CLIP_SECONDS = AST_SAMPLE_RATE, 1.0

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


# ---- what train.py uses: the toy backbones, scoring against the attributes, and the toy preset ----

def encoder_dir(modality: str) -> Path:
    _check_modality(modality)
    return TOY_DIR / ENCODER_OF[modality]


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


def train_preset(modality: str) -> dict:
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
    preset = train_preset("image")
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


if __name__ == "__main__":  # the command the README documents; the builder is toy_pretrain.py
    import sys
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if any(a.startswith("--export") for a in sys.argv[1:]):  # python toy.py --export DIR ...: the world as files
        export_main(sys.argv[1:])
    else:
        import toy_pretrain
        toy_pretrain.main(sys.argv[1:])  # all the backbones, or e.g. `python toy.py llama`: that one only
