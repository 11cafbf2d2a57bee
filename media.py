"""Media for the encoders: decoding images, audio and video files, and the image transform ViT and TimeSformer use.

Images through Pillow (EXIF orientation applied, every mode made RGB); WAV parsed here from its RIFF chunks
(PCM 8/16/24/32-bit, IEEE float, WAVE_FORMAT_EXTENSIBLE); other audio and video containers through PyAV, an
optional dependency imported only when needed; animated GIFs and folders of frame images without it.
Every failure is a MediaError whose one-line message names the file and the cause.

References: the WAVE format (Microsoft RIFF spec, WAVE_FORMAT_EXTENSIBLE), PyAV's documentation, the frame sampling
of eP-ALM / TimeSformer (num_frames frames, the centre of each of num_frames equal segments), and transformers'
ViTImageProcessor / VideoMAEImageProcessor and timm's eval transform (read only) for the image transform.
"""
import dataclasses
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fbank import resample

MODALITIES = ("image", "audio", "video")  # what the encoders see: one encoder, and one eP-ALM, per modality


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


def open_av(av, path: Path):
    # container tags from older encoders and phone apps are often not UTF-8; only the streams are needed here
    return av.open(str(path), metadata_errors="ignore")


# The containers epalm reads, by suffix (the data-set readers list clips by them too). PyAV is asked only about these:
# a file of another kind (a text file, a typo) is told what is read, rather than FFmpeg's "Invalid data" or a PyAV
# install hint. WAV goes by its header, images by what Pillow recognises.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".mpg", ".mpeg", ".3gp")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PIL_ANIMATION_SUFFIXES = (".gif", ".apng", ".webp", ".png")
READ_AUDIO = f"{' '.join(AUDIO_SUFFIXES)}, or the sound of a video ({' '.join(VIDEO_SUFFIXES)})"
READ_VIDEO = (f"{' '.join(VIDEO_SUFFIXES)}, animations ({' '.join(PIL_ANIMATION_SUFFIXES)}) or a folder of frame "
              "images")


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


def is_text(path: Path) -> bool:
    """Whether the file starts like UTF-8 text: no control characters but tabs and line breaks."""
    with open(path, "rb") as f:
        head = f.read(1024)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a character cut at the end of the 1024 bytes
            return False
        text = head[:error.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r" for c in text)


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
        what = "a text file, not an image" if is_text(path) else "not an image or unsupported image format"
        raise MediaError(f"{path}: {what} (Pillow reads JPEG, PNG, GIF, BMP, WebP, TIFF and more)") from None
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
    with open_av(av, path) as container:
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
        if not is_wav and path.suffix.lower() not in AUDIO_SUFFIXES + VIDEO_SUFFIXES:
            named = f"{path.suffix!r} is not" if path.suffix else "its name has no suffix naming"
            raise MediaError(f"{path}: not a WAV file, and {named} an audio format epalm reads: {READ_AUDIO}")
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
    with open_av(av, path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        total = container.streams.video[0].frames
        if total <= 0:  # not in the header (webm, mkv, some avi): count the packets, no decoding
            total = sum(1 for packet in container.demux(video=0) if packet.size > 0)
    if total <= 0:
        raise MediaError(f"{path}: video with no frames")
    wanted = segment_centres(total, num_frames, jitter)
    frames, decoded, last = {}, 0, None
    with open_av(av, path) as container:
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
    """num_frames RGB frames sampled uniformly over the clip: a VIDEO_SUFFIXES file (PyAV), an animated GIF, or a
    folder of frame images sorted by file name. jitter: random frame offsets within each segment (training)."""
    if num_frames < 1:
        raise ValueError(f"load_video: num_frames must be >= 1, got {num_frames}")
    path = Path(path)
    if path.is_dir():
        return frames_from_folder(path, num_frames, jitter)
    path = check_file(path)
    suffix = path.suffix.lower()
    if suffix in PIL_ANIMATION_SUFFIXES:
        return frames_from_animation(path, num_frames, jitter)
    if suffix not in VIDEO_SUFFIXES + AUDIO_SUFFIXES:  # PyAV names an audio file's missing video stream itself
        named = f"{path.suffix!r} is not" if path.suffix else "its name has no suffix naming"
        raise MediaError(f"{path}: {named} a video format epalm reads: {READ_VIDEO}")
    try:
        return frames_from_av(path, num_frames, jitter)
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"{path}: not a readable video, unsupported or corrupt ({one_line(error)})") from None


# ---- the image transform of ViT and TimeSformer (deterministic, pure PIL + torch) ----

@dataclass
class ImageTransform:
    resize: tuple[int, int] | None = (224, 224)  # exact (height, width)
    shortest_edge: int | None = None  # or: scale the shorter side to this, keep the aspect ratio
    crop: tuple[int, int] | None = None  # center crop (height, width) after resizing
    resample: int = Image.Resampling.BILINEAR
    rescale: float = 1 / 255
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)


def transform_from_hf(d: dict, default: ImageTransform, int_size_is_square: bool) -> ImageTransform:
    """Read an HF preprocessor_config.json (ViTImageProcessor / VideoMAEImageProcessor fields)."""
    def hw(v):
        return (v, v) if isinstance(v, int) else (v["height"], v["width"])

    t = dataclasses.replace(default)
    if "size" in d:
        size = d["size"]
        if isinstance(size, dict) and "shortest_edge" in size:
            t.resize, t.shortest_edge = None, size["shortest_edge"]
        elif isinstance(size, int) and not int_size_is_square:
            t.resize, t.shortest_edge = None, size
        else:
            t.resize, t.shortest_edge = hw(size), None
    if not d.get("do_resize", True):
        t.resize = t.shortest_edge = None
    if "crop_size" in d:
        t.crop = hw(d["crop_size"])
    if not d.get("do_center_crop", t.crop is not None):
        t.crop = None
    t.resample = d.get("resample", t.resample)
    t.rescale = d.get("rescale_factor", t.rescale) if d.get("do_rescale", True) else 1.0
    t.mean, t.std = tuple(d.get("image_mean", t.mean)), tuple(d.get("image_std", t.std))
    if not d.get("do_normalize", True):
        t.mean, t.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return t


def transform_from_timm(pretrained_cfg: dict) -> ImageTransform:
    """timm's eval transform: resize the short side to size / crop_pct, center crop, its own mean/std."""
    size = pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    bilinear = pretrained_cfg.get("interpolation") == "bilinear"
    resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
    return ImageTransform(resize=None, shortest_edge=math.floor(size / pretrained_cfg.get("crop_pct", 0.875)),
                          crop=(size, size), resample=resample,
                          mean=tuple(pretrained_cfg.get("mean", (0.5,) * 3)),
                          std=tuple(pretrained_cfg.get("std", (0.5,) * 3)))


def transform_image(image: Image.Image, t: ImageTransform) -> torch.Tensor:
    """One PIL image -> (3, H, W) float32 tensor."""
    image = image.convert("RGB")
    if t.resize is not None:
        image = image.resize((t.resize[1], t.resize[0]), resample=t.resample)
    elif t.shortest_edge is not None:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(t.shortest_edge * long / short)
        size = (t.shortest_edge, new_long) if w <= h else (new_long, t.shortest_edge)
        image = image.resize(size, resample=t.resample)
    if t.crop is not None:
        w, h = image.size
        top, left = (h - t.crop[0]) // 2, (w - t.crop[1]) // 2
        image = image.crop((left, top, left + t.crop[1], top + t.crop[0]))  # zero-pads if too small
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) * t.rescale
    mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
    return (x - mean) / std
