"""Data for eP-ALM training and sampling: examples and their text layout, media transforms with augmentation,
batches, and the cache of encoder features. Decoding is in media.py, the benchmark readers in benchmarks.py.

An Example is one media item with a prompt and a target: a caption is `</s> caption </s>` (empty prompt), VQA is
`</s> question? </a> answer </s>` (the official eP-ALM format); only the target and its `</s>` are trained on.
Those are OPT's ids (`</s>` is its BOS and EOS); a Llama-family LM gets `<bos> prompt target <eos>` with its own.

References: Shukor, Dancette, Cord, "eP-ALM: Efficient Perceptual Augmentation of Language Models" (ICCV 2023) and
its official code for the text layout; Park et al., "SpecAugment" (2019) as AST trains with it.
"""
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import fbank
import toy
# MODALITIES is read as data.MODALITIES by train.py and sample.py
from media import MODALITIES, MediaError, load_audio, load_image, load_video, transform_image  # noqa: F401


@dataclass
class Example:
    id: str                 # unique within its split (feature cache, predictions file)
    media: object           # a file path, or the decoded media itself (the toy world)
    prompt: str = ""        # text before the target: "" for a caption, "question? </a>" for VQA
    target: str = ""        # what is trained on: the caption, or " answer"
    references: list = field(default_factory=list)  # every reference caption / human answer, for scoring
    meta: dict = field(default_factory=dict)        # e.g. the toy world's attributes


def vqa_prompt(question: str) -> str:
    """VQA text is `</s> question? </a> answer </s>` (the official format); the tokenizer adds the `</s>`."""
    return question.strip() + " </a>"


def toy_examples(modality: str, task: str, split: str, n: int, seed: int) -> list[Example]:
    """The miniature world (toy.py) as examples: n media, each with its caption or one question per media."""
    out = []
    for i, s in enumerate(toy.samples(modality, split, n, seed)):
        meta = {"combo": s["combo"]}
        if task == "caption":
            out.append(Example(f"{split}-{i}", s["media"], "", s["caption"], [s["caption"]], meta))
        else:
            q, a = s["qa"][i % len(s["qa"])]
            out.append(Example(f"{split}-{i}", s["media"], vqa_prompt(q), " " + a, [a], {**meta, "answer": a}))
    return out


@dataclass
class MediaTransform:
    """File or decoded media -> the encoder's input tensor. Small and picklable: it runs in loader workers."""
    modality: str
    image: object = None          # media.ImageTransform (image and video)
    audio_frames: int = 1024      # AST input length
    audio_mean: float = fbank.AST_MEAN   # and its checkpoint's fbank normalisation
    audio_std: float = fbank.AST_STD
    num_frames: int = 8           # video frames
    train: bool = False           # augment: random resized crop + flip; SpecAugment; random frame offsets

    @staticmethod
    def for_encoder(modality: str, encoder, train: bool = False) -> "MediaTransform":
        if modality == "audio":
            c = encoder.config
            return MediaTransform("audio", audio_frames=c.max_length, audio_mean=c.feature_mean,
                                  audio_std=c.feature_std, train=train)
        frames = encoder.config.num_frames if modality == "video" else 8
        return MediaTransform(modality, image=encoder.transform, num_frames=frames, train=train)

    def __call__(self, media, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng or np.random.default_rng()
        if self.modality == "image":
            image = load_image(media) if isinstance(media, (str, Path)) else media
            return transform_image(self.augment_image(image, rng) if self.train else image, self.image)
        if self.modality == "audio":
            wave = load_audio(media) if isinstance(media, (str, Path)) else media
            x = fbank.preprocess(torch.as_tensor(wave, dtype=torch.float32), fbank.AST_SAMPLE_RATE,
                                 self.audio_frames, self.audio_mean, self.audio_std)
            return spec_augment(x, rng) if self.train else x
        if isinstance(media, (str, Path)):
            frames = load_video(media, self.num_frames, jitter=rng if self.train else None)
        else:
            frames = media
        if self.train:  # the same crop and flip for every frame of a clip
            clip_seed = int(rng.integers(2**32))
            frames = [self.augment_image(f, np.random.default_rng(clip_seed)) for f in frames]
        return torch.stack([transform_image(f, self.image) for f in frames])

    def augment_image(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Random resized crop (scale 0.5-1, aspect 3/4-4/3) and a horizontal flip half of the time."""
        w, h = image.size
        for _ in range(10):
            area = w * h * rng.uniform(0.5, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                image = image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
                break
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def spec_augment(x: torch.Tensor, rng: np.random.Generator, freq: int = 24, time: int = 96) -> torch.Tensor:
    """SpecAugment as AST trains: one frequency band and one time span (random widths up to freq / time) zeroed."""
    x = x.clone()
    frames, bins = x.shape
    f, t = int(rng.integers(0, freq + 1)), int(rng.integers(0, min(time, frames) + 1))
    f0, t0 = int(rng.integers(0, bins - f + 1)), int(rng.integers(0, frames - t + 1))
    x[:, f0:f0 + f] = 0
    x[t0:t0 + t, :] = 0
    return x


class ExampleDataset(torch.utils.data.Dataset):
    """Item i: (i, media tensor or None when it failed to decode), or (i, stored features) with a cache.
    Training asks for (i, epoch): example i's augmentation in that epoch is drawn from a generator seeded by
    (seed, epoch, i), so a run is a pure function of its seed, with loader workers or without, and a resumed
    run sees the augmented batches the uninterrupted run would have seen."""
    def __init__(self, examples: list[Example], transform: MediaTransform | None, features=None, seed: int = 0):
        self.examples, self.transform, self.features, self.seed = examples, transform, features, seed

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.features is not None:
            return i, self.features[i]
        try:
            return i, self.transform(self.examples[i].media, np.random.default_rng([self.seed, epoch, i]))
        except MediaError as e:
            print(f"warning: skipped {e}", file=sys.stderr)  # one line, also from a loader worker
            return i, None


def special_ids(tokenizer) -> tuple[int, int, int]:
    """BOS, EOS and pad: the ids a tokenizer carries (llama.TextTokenizer, from the checkpoint's config files),
    else OPT's tokens by name: `</s>` (BOS and EOS) and `<pad>`."""
    if hasattr(tokenizer, "eos_token_id"):
        return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = []
    for token in ("</s>", "<pad>"):
        ids.append(tokenizer.token_to_id(token))
        if ids[-1] is None:
            raise ValueError(f"the tokenizer has no {token} token, which eP-ALM's text layout needs (OPT's has it)")
    return ids[0], ids[0], ids[1]


def text_batch(tokenizer, prompts: list[str], targets: list[str] | None = None):
    """Left-padded ids and mask of `<bos> prompt target <eos>` (OPT: `</s> prompt target </s>`), and targets: the
    ids where the target text is, -100 on BOS, prompt and padding (model.py scores position t's logits against
    targets[t + 1])."""
    bos, eos, pad = special_ids(tokenizer)
    rows, sups = [], []
    for k, p in enumerate(prompts):
        prompt = [bos] + tokenizer.encode(p, add_special_tokens=False).ids
        target = [] if targets is None else tokenizer.encode(targets[k], add_special_tokens=False).ids + [eos]
        rows.append(prompt + target)
        sups.append([-100] * len(prompt) + target)
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    sup = torch.tensor([[-100] * (T - len(r)) + r for r in sups], dtype=torch.long)
    return ids, mask, sup


@dataclass
class Collate:
    """A list of (index, media or features) -> a batch {"media", "ids", "mask", "targets", "index", "dropped"}.
    Undecodable items (None) are dropped and counted; blind replaces the media by zeros (the control run)."""
    examples: list
    tokenizer: object
    blind: bool = False
    with_target: bool = True

    def __call__(self, items):
        good = [(i, m) for i, m in items if m is not None]
        batch = {"media": None, "ids": None, "mask": None, "targets": None, "index": [i for i, _ in good],
                 "dropped": len(items) - len(good)}
        if good:
            exs = [self.examples[i] for i, _ in good]
            batch["ids"], batch["mask"], batch["targets"] = text_batch(
                self.tokenizer, [e.prompt for e in exs], [e.target for e in exs] if self.with_target else None)
            media = torch.stack([m for _, m in good])
            batch["media"] = torch.zeros_like(media) if self.blind else media
        return batch


def model_inputs(batch: dict, device, cached: bool):
    """(media, features) for EPALM.forward / generate: a batch holds one or the other."""
    x = batch["media"].to(device, non_blocking=True) if batch["media"] is not None else None
    return (None, x) if cached else (x, None)


MAX_FAILED = 0.01  # more undecodable media than this stops a run: a wrong folder or format, not a few bad files


def check_failures(failed: int, total: int, what: str) -> None:
    """Stop the run when more than MAX_FAILED of `what` failed to decode, counted over at least 100 items
    (so that one bad file among the first few, or in a tiny split, is not yet a verdict)."""
    if failed > MAX_FAILED * max(total, 100):
        raise ValueError(f"more than {MAX_FAILED:.0%} of the {what} failed to decode ({failed} of {total}): "
                         f"check --data_dir (each failure was named above)")  # one line from configurator.run


def media_fingerprint(media) -> bytes:
    if isinstance(media, (str, Path)):
        try:
            st = os.stat(media)
            return f"{media}|{st.st_size}|{st.st_mtime_ns}".encode()
        except OSError:
            return f"{media}|missing".encode()
    if isinstance(media, (list, tuple)):
        return b"".join(media_fingerprint(m) for m in media)
    data = media.tobytes() if isinstance(media, Image.Image) else np.asarray(media).tobytes()
    return hashlib.sha1(data).digest()


def cached_features(model, examples: list[Example], transform: MediaTransform, cache_dir, key: str,
                    batch_size: int = 32, device="cpu", rank: int = 0, world: int = 1,
                    lockstep: bool = False) -> torch.Tensor:
    """The frozen encoder's K [CLS] tokens for every example, computed once and kept in
    cache_dir/<hash>.safetensors, so later runs skip the encoder. The hash covers `key` (the caller names the
    encoder, its weights, preprocessing and K) and every media item: a file by path, size and modification
    time, decoded media by content. Returns (N, K, D) float32 on the CPU; undecodable media give NaN rows.

    With several processes (rank of world) each encodes every world-th batch, the batches of a one-process run,
    so the features are bit-identical to that run's; all processes gather them (every one trains on all of
    them) and the first process of each machine writes the file, so a machine without a shared file system
    finds it next time too. lockstep (FSDP): every process runs the encoder equally often."""
    digest = hashlib.sha1(key.encode())
    for e in examples:
        digest.update(media_fingerprint(e.media))
    path = Path(cache_dir) / f"{digest.hexdigest()[:16]}.safetensors"
    found = [path.exists()] * world
    if world > 1:  # one decision for all: a process that computes while another loads would wait forever
        torch.distributed.all_gather_object(found, path.exists())
    if all(found):
        return load_file(str(path))["features"]
    num_batches = -(-len(examples) // batch_size)
    mine = list(range(rank, num_batches, world))
    if lockstep:
        mine += [None] * (-(-num_batches // world) - len(mine))  # None: an extra encoder call, result dropped
    parts = {}
    for k in tqdm(mine, desc="encoding media", unit="batch", leave=False, disable=rank != 0):
        inputs = []
        for e in examples[(k or 0) * batch_size:((k or 0) + 1) * batch_size]:
            try:
                inputs.append(transform(e.media))
            except MediaError as err:  # stored as NaN: the caller drops these examples
                if k is not None:
                    print(f"warning: skipped {err}", file=sys.stderr)
                inputs.append(None)
        ok = [x for x in inputs if x is not None]
        for e in examples if not ok and lockstep else []:  # the others are encoding: take part, on any media
            try:
                ok = [transform(e.media)]
                break
            except MediaError:
                pass
        feats = model.encode(torch.stack(ok).to(device)).float().cpu() if ok else None
        if k is None:
            continue
        blank = torch.full(feats.shape[1:] if feats is not None else
                           (model.config.num_levels, model.encoder.hidden_size), float("nan"))
        rows = iter(feats if feats is not None else [])
        parts[k] = torch.stack([next(rows) if x is not None else blank for x in inputs])
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, parts)
        parts = {k: v for p in gathered for k, v in p.items()}
    features = torch.cat([parts[k] for k in range(num_batches)])
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # machines sharing cache_dir write apart
        save_file({"features": features.contiguous()}, str(tmp), metadata={"key": key[:1000]})
        os.replace(tmp, path)
    return features

