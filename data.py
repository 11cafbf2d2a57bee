"""Data for eP-ALM: media decoding (images, audio, video), examples, batches, the feature cache, data sets.

Images through Pillow (EXIF orientation applied, every mode made RGB); WAV parsed here from its RIFF chunks
(PCM 8/16/24/32-bit, IEEE float, WAVE_FORMAT_EXTENSIBLE); other audio and video containers through PyAV, an
optional dependency imported only when needed; animated GIFs and folders of frame images without it.
Every failure is a MediaError whose one-line message names the file and the cause.

References: the WAVE format (Microsoft RIFF spec, WAVE_FORMAT_EXTENSIBLE), PyAV's documentation, and the
frame sampling of eP-ALM / TimeSformer (num_frames frames, the centre of each of num_frames equal segments).
"""
import csv
import hashlib
import json
import math
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import ast_audio
import toy
from ast_audio import resample
from vit import transform_image


class MediaError(ValueError):
    """A media file that cannot be read: missing, empty, truncated, or not in a format we decode."""


def check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if not path.is_file():
        raise MediaError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    return path


def import_av(path: Path):
    try:
        import av
    except ImportError:
        raise MediaError(f"{path}: decoding {path.suffix or 'this'} files needs PyAV: pip install av") from None
    return av


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---- images ----

def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: transparency composited on white, 16/32-bit and float rescaled to 0..255."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow keeps 16-bit greyscale in these modes; convert("L") would clip at 255 instead of scaling
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8))
    elif image.mode == "F":  # float images are taken to span 0..1
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path) -> Image.Image:
    """An RGB image, upright according to its EXIF orientation. Pillow's decompression-bomb guard stays on."""
    path = check_file(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # loads the pixels, so truncation surfaces here
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise MediaError(f"{path}: image too large ({one_line(error)})") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"{path}: not an image or unsupported image format") from None
    except Exception as error:
        raise MediaError(f"{path}: unreadable image, truncated or corrupt ({one_line(error)})") from None


# ---- audio ----

WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


def read_wav(path: Path, data: bytes) -> tuple[np.ndarray, int] | None:
    """(samples, channels) float32 and the sample rate of a RIFF/WAVE file; None for codecs left to PyAV."""
    fmt, samples = None, None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        body = data[offset + 8:offset + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise MediaError(f"{path}: truncated WAV fmt chunk")
            fmt = struct.unpack_from("<HHIIHH", body)
            if fmt[0] == WAVE_FORMAT_EXTENSIBLE:
                if len(body) < 40:
                    raise MediaError(f"{path}: truncated WAVE_FORMAT_EXTENSIBLE fmt chunk")
                fmt = (struct.unpack_from("<H", body, 24)[0],) + fmt[1:]  # sub-format GUID starts with the tag
        elif chunk_id == b"data":
            if size == 0xFFFFFFFF:  # written while streaming: the data runs to the end of the file
                body = data[offset + 8:]
            elif len(body) < size:
                raise MediaError(f"{path}: truncated WAV (data chunk declares {size} bytes, {len(body)} present)")
            samples = body
            break
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    if fmt is None or samples is None:
        raise MediaError(f"{path}: truncated or malformed WAV (no {'fmt' if fmt is None else 'data'} chunk)")
    tag, channels, sample_rate, _, block_align, bits = fmt
    if channels < 1 or sample_rate < 1 or bits < 1 or block_align != channels * ((bits + 7) // 8):
        raise MediaError(f"{path}: malformed WAV fmt chunk ({channels} channels, {sample_rate} Hz, {bits} bits, "
                         f"block {block_align} bytes)")
    samples = samples[:len(samples) // block_align * block_align]
    if tag == WAVE_FORMAT_PCM and bits == 8:  # 8-bit WAV is unsigned
        audio = (np.frombuffer(samples, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == WAVE_FORMAT_PCM and bits == 16:
        audio = np.frombuffer(samples, "<i2").astype(np.float32) / 32768.0
    elif tag == WAVE_FORMAT_PCM and bits == 24:
        raw = np.frombuffer(samples, np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        audio = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    elif tag == WAVE_FORMAT_PCM and bits == 32:  # also 24 valid bits in a 32-bit container: left-justified
        audio = (np.frombuffer(samples, "<i4") / float(1 << 31)).astype(np.float32)
    elif tag == WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64):
        audio = np.frombuffer(samples, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        return None
    return audio.reshape(-1, channels), sample_rate


def decode_audio_av(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the sample rate of any container/codec FFmpeg reads."""
    av = import_av(path)
    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        sample_rate = stream.codec_context.sample_rate or stream.rate
        to_float = av.AudioResampler(format="fltp")  # planar float32, same layout and rate
        for frame in container.decode(stream):
            chunks += [f.to_ndarray() for f in to_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_float.resample(None)]
        declared = float(stream.duration * stream.time_base) if stream.duration else 0.0
    audio = np.concatenate(chunks, axis=1).T if chunks else np.zeros((0, 1), np.float32)
    # encoders pad or trim a little (mp3, aac), so only a clearly short decode counts as truncation
    if declared and len(audio) < 0.95 * declared * sample_rate - 4096:
        raise MediaError(f"{path}: truncated audio (decoded {len(audio) / sample_rate:.2f} s of {declared:.2f} s)")
    return np.ascontiguousarray(audio, dtype=np.float32), int(sample_rate)


def load_audio(path, sample_rate: int = 16000) -> torch.Tensor:
    """Mono float32 waveform (samples,) in [-1, 1] at sample_rate: channels averaged, band-limited resampling."""
    path = check_file(path)
    try:
        with open(path, "rb") as f:
            header = f.read(12)
            is_wav = header[:4] == b"RIFF" and header[8:12] == b"WAVE"
            decoded = read_wav(path, header + f.read()) if is_wav else None
        audio, rate = decoded if decoded is not None else decode_audio_av(path)
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{path}: not a readable audio file, unsupported or corrupt ({one_line(error)})") from None
    if audio.size == 0:
        raise MediaError(f"{path}: zero-length audio")
    if not np.isfinite(audio).all():
        raise MediaError(f"{path}: audio contains NaN or infinite samples")
    mono = torch.from_numpy(audio.mean(axis=1, dtype=np.float32))
    return resample(mono, rate, sample_rate) if rate != sample_rate else mono


# ---- video ----

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PIL_ANIMATION_SUFFIXES = (".gif", ".apng", ".webp", ".png")


def segment_centres(total: int, num_frames: int, jitter: np.random.Generator | None = None) -> list[int]:
    """Index of the centre frame of each of num_frames equal segments (with jitter: a random frame of each
    segment, the training-time augmentation); short clips repeat frames."""
    offsets = jitter.random(num_frames) if jitter is not None else np.full(num_frames, 0.5)
    return [min(total - 1, int((i + offsets[i]) * total / num_frames)) for i in range(num_frames)]


def frames_from_folder(path: Path, num_frames: int, jitter=None) -> list[Image.Image]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise MediaError(f"{path}: video folder has no frame images ({', '.join(FRAME_SUFFIXES)})")
    return [load_image(files[i]) for i in segment_centres(len(files), num_frames, jitter)]


def frames_from_animation(path: Path, num_frames: int, jitter=None) -> list[Image.Image]:
    try:
        with Image.open(path) as image:
            total = getattr(image, "n_frames", 1)
            wanted, frames = segment_centres(total, num_frames, jitter), {}
            for index in sorted(set(wanted)):
                image.seek(index)  # Pillow replays disposal and palettes of the earlier frames
                frames[index] = to_rgb(image)
    except Image.UnidentifiedImageError:
        raise MediaError(f"{path}: not an image or unsupported format") from None
    except Exception as error:
        raise MediaError(f"{path}: unreadable animation, truncated or corrupt ({one_line(error)})") from None
    return [frames[i] for i in wanted]


def frames_from_av(path: Path, num_frames: int, jitter=None) -> list[Image.Image]:
    av = import_av(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        total = container.streams.video[0].frames
        if total <= 0:  # not in the header (webm, mkv, some avi): count the packets, no decoding
            total = sum(1 for packet in container.demux(video=0) if packet.size > 0)
    if total <= 0:
        raise MediaError(f"{path}: video with no frames")
    wanted = segment_centres(total, num_frames, jitter)
    frames, decoded, last = {}, 0, None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                frames[index] = frame.to_image()  # RGB PIL image
            decoded, last = index + 1, frame
    if decoded < 0.95 * total or last is None:
        raise MediaError(f"{path}: truncated video (decoded {decoded} of {total} frames)")
    # headers may count a frame or two the decoder never returns (edit lists): those wanted get the last one
    for index in wanted:
        if index not in frames:
            frames[index] = last.to_image()
    return [frames[i] for i in wanted]


def load_video(path, num_frames: int = 8, jitter: np.random.Generator | None = None) -> list[Image.Image]:
    """num_frames RGB frames sampled uniformly over the clip: mp4/avi/webm/mkv/mov (PyAV), animated GIF, or a
    folder of frame images sorted by file name. jitter: random frame offsets within each segment (training)."""
    if num_frames < 1:
        raise ValueError(f"load_video: num_frames must be >= 1, got {num_frames}")
    path = Path(path)
    if path.is_dir():
        return frames_from_folder(path, num_frames, jitter)
    path = check_file(path)
    if path.suffix.lower() in PIL_ANIMATION_SUFFIXES:
        return frames_from_animation(path, num_frames, jitter)
    try:
        return frames_from_av(path, num_frames, jitter)
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{path}: not a readable video, unsupported or corrupt ({one_line(error)})") from None


# ---- examples, media transforms, batches and the feature cache (train.py, sample.py) ----
MODALITIES = ("image", "audio", "video")


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
    image: object = None          # vit.ImageTransform (image and video)
    audio_frames: int = 1024      # AST input length
    num_frames: int = 8           # video frames
    train: bool = False           # augment: random resized crop + flip; SpecAugment; random frame offsets

    @staticmethod
    def for_encoder(modality: str, encoder, train: bool = False) -> "MediaTransform":
        if modality == "audio":
            return MediaTransform("audio", audio_frames=encoder.config.max_length, train=train)
        frames = encoder.config.num_frames if modality == "video" else 8
        return MediaTransform(modality, image=encoder.transform, num_frames=frames, train=train)

    def __call__(self, media, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng or np.random.default_rng()
        if self.modality == "image":
            image = load_image(media) if isinstance(media, (str, Path)) else media
            return transform_image(self.augment_image(image, rng) if self.train else image, self.image)
        if self.modality == "audio":
            wave = load_audio(media) if isinstance(media, (str, Path)) else media
            x = ast_audio.preprocess(torch.as_tensor(wave, dtype=torch.float32), 16000, self.audio_frames)
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
    """Item i: (i, media tensor or None when it failed to decode), or (i, stored features) with a cache."""
    def __init__(self, examples: list[Example], transform: MediaTransform | None, features=None):
        self.examples, self.transform, self.features = examples, transform, features

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        if self.features is not None:
            return i, self.features[i]
        try:
            return i, self.transform(self.examples[i].media)
        except MediaError as e:
            print(f"warning: skipped {e}", file=sys.stderr)  # one line, also from a loader worker
            return i, None


def text_batch(tokenizer, prompts: list[str], targets: list[str] | None = None, eos: int = 2, pad: int = 1):
    """Left-padded ids and mask of `</s> prompt target </s>`, and targets: the ids where the target text is,
    -100 on BOS, prompt and padding (model.py scores position t's logits against targets[t + 1])."""
    rows, sups = [], []
    for k, p in enumerate(prompts):
        prompt = tokenizer.encode(p).ids
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
                    batch_size: int = 32, device="cpu") -> torch.Tensor:
    """The frozen encoder's K [CLS] tokens for every example, computed once and kept in
    cache_dir/<hash>.safetensors, so later runs skip the encoder. The hash covers `key` (the caller names the
    encoder, its weights, preprocessing and K) and every media item: a file by path, size and modification
    time, decoded media by content. Returns (N, K, D) float32 on the CPU."""
    digest = hashlib.sha1(key.encode())
    for e in examples:
        digest.update(media_fingerprint(e.media))
    path = Path(cache_dir) / f"{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["features"]
    chunks = []
    for start in tqdm(range(0, len(examples), batch_size), desc="encoding media", unit="batch", leave=False):
        batch = []
        for e in examples[start:start + batch_size]:
            try:
                batch.append(transform(e.media))
            except MediaError as err:  # stored as NaN: the caller drops these examples
                print(f"warning: skipped {err}", file=sys.stderr)
                batch.append(None)
        ok = [x for x in batch if x is not None]
        feats = model.encode(torch.stack(ok).to(device)).float().cpu() if ok else None
        out, j = [], 0
        for x in batch:
            out.append(feats[j] if x is not None else torch.full(feats.shape[1:] if feats is not None else
                                                                 (model.config.num_levels, model.encoder.hidden_size),
                                                                 float("nan")))
            j += x is not None
        chunks.append(torch.stack(out))
    features = torch.cat(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": features.contiguous()}, str(tmp), metadata={"key": key[:1000]})
    os.replace(tmp, path)
    return features


# ---- data sets: the paper's benchmarks in their standard layouts ----
# name       task     files under the root folder (where they come from)
# coco       caption  dataset_coco.json, Karpathy's split (cs.stanford.edu/people/karpathy/deepimagesent), and the
#                     images it names (filepath/filename) in train2014/ and val2014/ (cocodataset.org)
# vqav2      vqa      v2_OpenEnded_mscoco_{train,val}2014_questions.json and v2_mscoco_{train,val}2014_annotations.json
#                     (visualqa.org), images in {train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg
# gqa        vqa      {split}_balanced_questions.json (id -> {imageId, question, answer}) and images/{imageId}.jpg
#                     (cs.stanford.edu/people/dorarad/gqa)
# audiocaps  caption  {split}.csv (audiocap_id,youtube_id,start_time,caption; github.com/cdjkim/audiocaps) and the
#                     clips, cut from YouTube by the user, in {split}/ named {youtube_id} or {audiocap_id} with any of
#                     AUDIO_SUFFIXES; YouTube loses videos, so rows without a clip are skipped with one warning
# msrvtt     caption  MSRVTT_data.json (as CLIP4Clip ships it) or the official train_val_videodatainfo.json:
#                     "videos" [{video_id, split}], "sentences" [{video_id, caption}]; videos/{video_id}.mp4; split
#                     test is the 1k-A set when MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence) is there
# msrvtt_qa  vqa      {split}_qa.json [{question, answer, video_id: 7}] (github.com/xudejing/video-question-answering)
#                     and videos/video7.mp4
# msvd_qa    vqa      {split}_qa.json [{question, answer, video_id: 1}] (same source) and videos/ with the clip named
#                     by youtube_mapping.txt ("-4wsuPCjDBc_5_15 vid1" per line) if present, else vid1
# Captions: a training split gives one Example per caption, an evaluation split one per media with every caption as
# references. VQA: one Example per question in every split. Media files may have any extension where a folder
# listing finds them (audio, video); images are named by the annotations.
DATASETS = {"coco": "caption", "vqav2": "vqa", "gqa": "vqa", "audiocaps": "caption", "msrvtt": "caption",
            "msrvtt_qa": "vqa", "msvd_qa": "vqa"}
SPLITS = {"coco": ("train", "val", "test"), "vqav2": ("train", "val"), "gqa": ("train", "val", "testdev"),
          "audiocaps": ("train", "val", "test"), "msrvtt": ("train", "val", "test"),
          "msrvtt_qa": ("train", "val", "test"), "msvd_qa": ("train", "val", "test")}
LAYOUTS = {  # said in the error when something is missing
    "coco": "dataset_coco.json + train2014/, val2014/",
    "vqav2": "v2_OpenEnded_mscoco_{split}2014_questions.json + v2_mscoco_{split}2014_annotations.json + {split}2014/",
    "gqa": "{split}_balanced_questions.json + images/",
    "audiocaps": "{split}.csv + {split}/ with the clips",
    "msrvtt": "MSRVTT_data.json or train_val_videodatainfo.json (+ MSRVTT_JSFUSION_test.csv) + videos/",
    "msrvtt_qa": "{split}_qa.json + videos/",
    "msvd_qa": "{split}_qa.json + videos/ (+ youtube_mapping.txt)"}
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


def annotation_file(root: Path, name: str, *candidates: str, required: bool = True) -> Path | None:
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    if required:
        raise FileNotFoundError(f"{root / candidates[0]}: missing {name} annotation file "
                                f"(expected under {root}: {LAYOUTS[name]})")
    return None


def media_dir(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing {name} media folder (expected: {LAYOUTS[name]})")
    return path


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None


def read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
        f.seek(0)
        # JSFusion's csv circulates with ',' and with ';' between fields
        rows = csv.DictReader(f, delimiter=max(",;\t", key=header.count))
        missing = [c for c in columns if c not in (rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {rows.fieldnames})")
        return list(rows)


def media_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Name without extension -> file, from one directory listing rather than a stat per annotation."""
    return {Path(e.name).stem: Path(e.path) for e in os.scandir(folder) if e.name.lower().endswith(suffixes)}


def caption_examples(groups: list[tuple], split: str) -> list[Example]:
    """groups: (media id, media, captions, meta)."""
    if split == "train":
        return [Example(f"{i}_{k}", m, "", c, caps, meta) for i, m, caps, meta in groups for k, c in enumerate(caps)]
    return [Example(str(i), m, "", caps[0], caps, meta) for i, m, caps, meta in groups]


def qa_example(id, media, question: str, answer: str, references: list, meta: dict) -> Example:
    return Example(str(id), media, vqa_prompt(question), " " + answer.strip(), references,
                   {**meta, "question": question})


def read_coco(root: Path, split: str) -> list[Example]:
    images = read_json(annotation_file(root, "coco", "dataset_coco.json"))["images"]
    wanted = ("train", "restval") if split == "train" else (split,)  # restval: the val2014 images Karpathy trains on
    groups = [(im["cocoid"], root / im["filepath"] / im["filename"], [s["raw"].strip() for s in im["sentences"]],
               {"image_id": im["cocoid"]}) for im in images if im["split"] in wanted]
    for folder in {m.parent for _, m, _, _ in groups}:
        media_dir(folder, "coco")
    return caption_examples(groups, split)


def read_vqav2(root: Path, split: str) -> list[Example]:
    coco = f"{split}2014"
    questions = read_json(annotation_file(root, "vqav2", f"v2_OpenEnded_mscoco_{coco}_questions.json"))["questions"]
    annotation_path = annotation_file(root, "vqav2", f"v2_mscoco_{coco}_annotations.json")
    annotations = {a["question_id"]: a for a in read_json(annotation_path)["annotations"]}
    folder, out = media_dir(root / coco, "vqav2"), []
    for q in questions:
        if q["question_id"] not in annotations:
            raise ValueError(f"{annotation_path}: no annotation for question_id {q['question_id']}")
        a = annotations[q["question_id"]]
        humans = [h["answer"] for h in a["answers"]]
        # the official files carry the majority answer; the most frequent of the ten stands in where it is absent
        answer = a.get("multiple_choice_answer") or max(humans, key=humans.count)
        out.append(qa_example(q["question_id"], folder / f"COCO_{coco}_{q['image_id']:012d}.jpg", q["question"],
                              answer, humans, {"image_id": q["image_id"]}))
    return out


def read_gqa(root: Path, split: str) -> list[Example]:
    questions = read_json(annotation_file(root, "gqa", f"{split}_balanced_questions.json"))
    folder = media_dir(root / "images", "gqa")
    return [qa_example(i, folder / f"{q['imageId']}.jpg", q["question"], q["answer"], [q["answer"]],
                       {"image_id": q["imageId"]}) for i, q in questions.items()]


def read_audiocaps(root: Path, split: str) -> list[Example]:
    path = annotation_file(root, "audiocaps", f"{split}.csv")
    rows = read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption"))
    folder = media_dir(root / split, "audiocaps")
    clips = media_files(folder, AUDIO_SUFFIXES)
    by_video = {}  # an evaluation clip has 5 rows (5 captions), a training clip usually 1
    for r in rows:
        by_video.setdefault(r["youtube_id"], []).append(r)
    groups, skipped = [], 0
    for video, rs in by_video.items():
        clip = next((clips[n] for n in [video] + [r["audiocap_id"] for r in rs] if n in clips), None)
        if clip is None:
            skipped += len(rs)
            continue
        meta = {"youtube_id": video, "start_time": rs[0]["start_time"], "audiocap_ids": [r["audiocap_id"] for r in rs]}
        groups.append((video, clip, [r["caption"].strip() for r in rs], meta))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} of {len(rows)} rows whose clip is not in {folder}")
    return caption_examples(groups, split)


def video_files(root: Path, name: str, names: list[str]) -> list[Path]:
    folder = media_dir(root / "videos", name)
    files = media_files(folder, VIDEO_SUFFIXES)
    missing = [n for n in names if n not in files]
    if missing:
        raise FileNotFoundError(f"{folder}: no video file for {len(missing)} of {len(names)} clips, e.g. {missing[0]}")
    return [files[n] for n in names]


def read_msrvtt(root: Path, split: str) -> list[Example]:
    jsfusion = root / "MSRVTT_JSFUSION_test.csv"
    one_k_a = split == "test" and jsfusion.is_file()
    path = annotation_file(root, "msrvtt", "MSRVTT_data.json", "train_val_videodatainfo.json", required=not one_k_a)
    info = read_json(path) if path else {"videos": [], "sentences": []}
    captions = {}
    for s in info["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"].strip())
    if one_k_a:  # 1000 test videos (JSFusion); scored against all their captions when the json is there
        rows = read_csv(jsfusion, ("video_id", "sentence"))
        videos = [r["video_id"] for r in rows]
        for r in rows:
            captions.setdefault(r["video_id"], [r["sentence"].strip()])
    else:
        videos = [v["video_id"] for v in info["videos"] if v["split"] == {"val": "validate"}.get(split, split)]
    files = video_files(root, "msrvtt", videos)
    return caption_examples([(v, f, captions[v], {"video_id": v}) for v, f in zip(videos, files)], split)


def read_video_qa(root: Path, name: str, split: str) -> list[Example]:
    items = read_json(annotation_file(root, name, f"{split}_qa.json"))
    names = {}  # msvd: vid<N> -> YouTube clip name
    mapping = root / "youtube_mapping.txt"
    if name == "msvd_qa" and mapping.is_file():
        for n, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{mapping}: line {n} is not '<clip name> vid<N>': {line[:80]!r}")
            names[fields[1]] = fields[0]
    prefix = "video" if name == "msrvtt_qa" else "vid"
    videos = [names.get(v, v) for v in (f"{prefix}{q['video_id']}" if isinstance(q["video_id"], int)
                                        else str(q["video_id"]) for q in items)]
    files = video_files(root, name, videos)
    return [qa_example(q.get("id", k), f, q["question"], str(q["answer"]), [str(q["answer"])], {"video_id": v})
            for k, (q, v, f) in enumerate(zip(items, videos, files))]


def read_dataset(name: str, root, split: str) -> list[Example]:
    """The examples of one split of one of the paper's data sets, read from its standard layout under root (the
    table above)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"{name}: unknown split {split!r}: expected one of {', '.join(SPLITS[name])}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {name} root folder does not exist (expected in it: {LAYOUTS[name]})")
    try:
        if name == "coco":
            examples = read_coco(root, split)
        elif name == "vqav2":
            examples = read_vqav2(root, split)
        elif name == "gqa":
            examples = read_gqa(root, split)
        elif name == "audiocaps":
            examples = read_audiocaps(root, split)
        elif name == "msrvtt":
            examples = read_msrvtt(root, split)
        else:
            examples = read_video_qa(root, name, split)
    except (KeyError, TypeError) as e:  # a record without a field, or a field of the wrong kind
        raise ValueError(f"{root}: malformed {name} annotations ({type(e).__name__}: {one_line(e)})") from None
    if not examples:
        raise ValueError(f"{root}: no {name} examples in split {split!r}")
    return examples
