"""Media decoding (media.py) and the AST front end (fbank.py: fbank / resample / preprocess).

References: transformers' ASTFeatureExtractor on its numpy path (no torchaudio), the stdlib wave module and
PyAV decoding the same files directly, analytic signals (sines) and hand-computed frame indices.
"""
import io
import struct
import sys
import wave

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ASTFeatureExtractor
from transformers.models.audio_spectrogram_transformer import feature_extraction_audio_spectrogram_transformer as ast_fe

from conftest import TESTDATA
from fbank import fbank, preprocess, resample
from media import MediaError, load_audio, load_image, load_video

AUDIO, IMAGES, VIDEO = TESTDATA / "audio", TESTDATA / "images", TESTDATA / "video"


def read_wav_stdlib(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return pcm.astype(np.float64) / 32768.0, w.getframerate()


def decode_av_reference(path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray() for f in c.decode(audio=0)]
        rate = c.streams.audio[0].rate
    assert frames[0].dtype == np.int16  # the FLAC test file is 16-bit, decoded packed s16
    return np.concatenate(frames, axis=1).reshape(-1).astype(np.float64) / 32768.0, rate


@pytest.fixture
def numpy_extractor(monkeypatch):
    """transformers' ASTFeatureExtractor forced onto its numpy path (transformers.audio_utils), never torchaudio."""
    monkeypatch.setattr(ast_fe, "is_speech_available", lambda: False)

    def make(**kwargs):
        with pytest.warns(UserWarning, match="mel filter has all zero values"):  # the Nyquist column: harmless
            extractor = ASTFeatureExtractor(**kwargs)
        assert hasattr(extractor, "mel_filters")  # built by the numpy path
        return extractor
    return make


# ---- AST front end vs transformers ----

@pytest.mark.parametrize("name", ["speech_16k_mono.wav", "speech_16k.flac"])
@pytest.mark.parametrize("target_length", [1024, 160])  # padded (3.3 s and 2.1 s are < 1024 frames) and cut
def test_preprocess_matches_transformers(name, target_length, numpy_extractor):
    waveform = load_audio(AUDIO / name)
    extractor = numpy_extractor(max_length=target_length)
    expected = extractor(waveform.numpy(), sampling_rate=16000, return_tensors="np")["input_values"][0]
    ours = preprocess(waveform, 16000, target_length=target_length)
    assert ours.shape == (target_length, 128) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - expected).max() < 1e-3
    # the un-normalised fbank too, on the frames that hold signal (the extractor normalises after padding)
    frames = min(target_length, 1 + (waveform.numel() - 400) // 160)
    expected_fbank = expected[:frames] * (4.5689974 * 2) - 4.2677393
    assert np.abs(fbank(waveform, 16000).numpy()[:frames] - expected_fbank).max() < 1e-3 * 4.5689974 * 2


def test_fbank_rejects_bad_input():
    with pytest.raises(ValueError, match="shorter than one 400-sample frame"):
        fbank(torch.zeros(399), 16000)
    with pytest.raises(ValueError, match="1-D"):
        fbank(torch.zeros(2, 16000), 16000)


def test_preprocess_resamples_to_16k(numpy_extractor):
    # the speech at 32 kHz (numpy's FFT interpolation: exact band-limited upsampling, independent of our
    # resampler) must give nearly the AST input of the 16 kHz original once preprocess brings it back to 16 kHz
    waveform = load_audio(AUDIO / "speech_16k_mono.wav").double().numpy()
    spectrum = np.fft.rfft(waveform)
    upsampled = np.fft.irfft(np.concatenate([spectrum, np.zeros(len(waveform))]), n=2 * len(waveform)) * 2
    expected = numpy_extractor()(waveform.astype(np.float32), sampling_rate=16000, return_tensors="np")
    ours = preprocess(torch.from_numpy(upsampled).float(), 32000)
    frames = 1 + (len(waveform) - 400) // 160
    # our low-pass rolls off from ~6.6 kHz (cut-off 0.945 * 8 kHz): compare the mel bins wholly below 6.2 kHz
    edges_hz = 700 * np.expm1(np.linspace(1127 * np.log1p(20 / 700), 1127 * np.log1p(8000 / 700), 130) / 1127)
    bins = int((edges_hz[2:] < 6200).sum())
    assert bins > 100
    difference = np.abs(ours.numpy()[:frames, :bins] - expected["input_values"][0][:frames, :bins])
    assert difference.mean() < 1e-4 and difference.max() < 0.02  # the max: near-silent bins, where log magnifies


# ---- resampling ----

def peak_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[spectrum.argmax()])


def test_resample_keeps_tone_and_removes_aliases():
    t = np.arange(48000) / 48000
    tone = torch.from_numpy(np.sin(2 * np.pi * 1000 * t)).float()
    out = resample(tone, 48000, 16000).numpy()
    assert out.shape == (16000,)
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(out[100:-100] - expected[100:-100]).max() < 1e-3  # edges see the zero padding
    # 11 kHz is above the new Nyquist (8 kHz): naive decimation would fold it to 5 kHz at full amplitude
    above = resample(torch.from_numpy(np.sin(2 * np.pi * 11000 * t)).float(), 48000, 16000).numpy()
    assert np.sqrt(np.mean(above[100:-100] ** 2)) < 1e-3
    assert np.sqrt(np.mean(np.sin(2 * np.pi * 11000 * t)[::3] ** 2)) > 0.5  # what decimation would have kept


@pytest.mark.parametrize("orig,new", [(8000, 16000), (44100, 16000), (22050, 16000), (16001, 16000)])
def test_resample_other_rates(orig, new):
    n = orig // 2
    tone = torch.from_numpy(np.sin(2 * np.pi * 440 * np.arange(n) / orig)).float()
    out = resample(tone, orig, new).numpy()
    assert len(out) == -(-n * new // orig)
    expected = np.sin(2 * np.pi * 440 * np.arange(len(out)) / new)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 1e-3


def test_tone_file_resampled_keeps_frequency():
    raw, rate = read_wav_stdlib(AUDIO / "tone_48k_mono.wav")
    assert rate == 48000
    reference_peak = peak_frequency(raw[:, 0], rate)
    out = load_audio(AUDIO / "tone_48k_mono.wav", sample_rate=16000).numpy()
    assert len(out) == len(raw) // 3
    assert abs(peak_frequency(out, 16000) - reference_peak) <= 16000 / len(out) + 1e-9
    native = load_audio(AUDIO / "tone_48k_mono.wav", sample_rate=48000).numpy()
    assert np.abs(native - raw[:, 0]).max() < 1e-6


# ---- audio files ----

def test_speech_wavs_match_stdlib_wave():
    mono, _ = read_wav_stdlib(AUDIO / "speech_16k_mono.wav")
    assert np.abs(load_audio(AUDIO / "speech_16k_mono.wav").numpy() - mono[:, 0]).max() < 1e-7
    stereo, _ = read_wav_stdlib(AUDIO / "speech_16k_stereo.wav")
    assert stereo.shape[1] == 2 and np.abs(stereo[:, 0] - stereo[:, 1]).max() > 0.01  # really two channels
    ours = load_audio(AUDIO / "speech_16k_stereo.wav")
    assert ours.dtype == torch.float32 and ours.dim() == 1
    assert np.abs(ours.numpy() - stereo.mean(axis=1)).max() < 1e-7


def test_flac_matches_pyav():
    expected, rate = decode_av_reference(AUDIO / "speech_16k.flac")
    assert rate == 16000
    assert np.abs(load_audio(AUDIO / "speech_16k.flac").numpy() - expected).max() < 1e-7


def wav_bytes(tag: int, bits: int, channels: int, rate: int, payload: bytes, extensible: bool = False,
              valid_bits: int | None = None) -> bytes:
    block = channels * bits // 8
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22,
                          valid_bits or bits, 3) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    # an unknown chunk before "fmt " and an odd-sized one before "data" exercise the chunk walk and padding
    chunks = b"JUNK" + struct.pack("<I", 4) + b"abcd" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", 3) + b"xyz\x00" + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def stdlib_pcm(samples: np.ndarray, width: int, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.rint(samples * 127) + 128).astype(np.uint8).tobytes())
        else:
            ints = np.rint(samples * (2 ** (8 * width - 1) - 1)).astype(np.int64)
            w.writeframes(b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1)))
    return buffer.getvalue()


def test_wav_encodings_read_back(tmp_path):
    rate = 16000
    t = np.arange(800) / rate
    left, right = 0.6 * np.sin(2 * np.pi * 440 * t), 0.3 * np.cos(2 * np.pi * 1000 * t)
    stereo = np.stack([left, right], axis=1)
    expected = stereo.mean(axis=1)
    # the stdlib writer scales by 2**(bits-1) - 1 and we read by 2**(bits-1): tolerances cover that and rounding
    tolerances = {1: 1 / 64, 2: 1e-4, 3: 1e-6, 4: 1e-7}
    files = {f"pcm{8 * w}.wav": (stdlib_pcm(stereo, w, rate), tolerances[w]) for w in (1, 2, 3, 4)}
    files["float32.wav"] = (wav_bytes(3, 32, 2, rate, stereo.astype("<f4").tobytes()), 1e-7)
    files["float64.wav"] = (wav_bytes(3, 64, 2, rate, stereo.astype("<f8").tobytes()), 1e-7)
    files["ext_float32.wav"] = (wav_bytes(3, 32, 2, rate, stereo.astype("<f4").tobytes(), extensible=True), 1e-7)
    pcm24_in_32 = (np.rint(stereo * (2 ** 23 - 1)).astype("<i4") << 8).tobytes()  # left-justified 24 valid bits
    files["ext_24in32.wav"] = (wav_bytes(1, 32, 2, rate, pcm24_in_32, extensible=True, valid_bits=24), 2 ** -22)
    files["ext_pcm16.wav"] = (wav_bytes(1, 16, 2, rate, np.rint(stereo * 32767).astype("<i2").tobytes(),
                                        extensible=True), 2 ** -14)
    for name, (payload, tolerance) in files.items():
        (tmp_path / name).write_bytes(payload)
        out = load_audio(tmp_path / name)
        assert out.dtype == torch.float32 and out.shape == (800,), name
        assert np.abs(out.numpy() - expected).max() <= tolerance, name
    mono = wav_bytes(1, 16, 1, rate, np.rint(left * 32767).astype("<i2").tobytes())
    (tmp_path / "mono.wav").write_bytes(mono)
    assert np.abs(load_audio(tmp_path / "mono.wav").numpy() - left).max() < 2 ** -14


def test_wav_errors(tmp_path):
    zero = tmp_path / "zero.wav"
    zero.write_bytes(wav_bytes(1, 16, 1, 16000, b""))
    with pytest.raises(MediaError, match="zero-length audio"):
        load_audio(zero)
    short = tmp_path / "short.wav"
    short.write_bytes(wav_bytes(1, 16, 1, 16000, b"\x00\x01" * 100)[:-50])
    with pytest.raises(MediaError, match="truncated WAV"):
        load_audio(short)


# ---- images ----

def test_test_images_decode_to_rgb():
    for path in sorted(IMAGES.iterdir()):
        image = load_image(path)
        assert image.mode == "RGB" and image.size == Image.open(path).size, path.name


def test_exif_orientation_applied(tmp_path):
    raw = Image.open(IMAGES / "hopper_orientation_6.jpg")
    assert raw.getexif()[0x0112] == 6
    upright = np.asarray(load_image(IMAGES / "hopper_orientation_6.jpg")).astype(float)
    # orientation 6 = stored rotated 90 degrees counter-clockwise: shown after a clockwise turn
    assert np.array_equal(upright, np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    hopper = np.asarray(Image.open(IMAGES / "hopper.jpg").convert("RGB")).astype(float)
    assert np.abs(upright - hopper).mean() < 10 < np.abs(np.asarray(raw.convert("RGB")) - hopper).mean()
    # a non-square one: the size swaps
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "wide.jpg", exif=exif)
    assert Image.open(tmp_path / "wide.jpg").size == (40, 20)
    assert load_image(tmp_path / "wide.jpg").size == (20, 40)


def test_rgba_composited_on_white():
    raw = np.asarray(Image.open(IMAGES / "pil123rgba.png"))
    out = np.asarray(load_image(IMAGES / "pil123rgba.png")).astype(float)
    alpha = raw[..., 3:].astype(float) / 255
    assert np.abs(out - (raw[..., :3] * alpha + 255 * (1 - alpha))).max() <= 1.0
    assert (out[raw[..., 3] == 0] == 255).all()


def test_image_modes(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    cases = {
        "l.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        "la.png": (Image.fromarray(gray).convert("LA"), np.repeat(gray[..., None], 3, axis=2)),
        "la_clear.png": (Image.merge("LA", [Image.fromarray(gray), Image.new("L", (8, 8), 0)]),
                         np.full((8, 8, 3), 255)),
        "i16.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, axis=2)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), np.array([255, 0, 0])),
    }
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    cases["p.png"] = (palette, np.array([0, 0, 255]))
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    cases["p_transparent.png"] = (transparent, np.array([255, 255, 255]))
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        saved = Image.open(tmp_path / name)
        assert saved.mode == image.mode, (name, saved.mode)  # the file really holds that mode
        out = np.asarray(load_image(tmp_path / name)).astype(float)
        assert out.shape == (8, 8, 3), name
        assert np.abs(out - expected).max() <= (8 if name.endswith(".jpg") else 0), name


def test_decompression_bomb_guard_kept(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000: Pillow refuses
    with pytest.raises(MediaError, match="big.png: image too large"):
        load_image(tmp_path / "big.png")


# ---- video ----

def all_frames_av(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("name", ["armwrestling_340x256.mp4", "short_32frames.mp4"])
def test_mp4_frames_are_segment_centres(name):
    reference = all_frames_av(VIDEO / name)
    frames = load_video(VIDEO / name, num_frames=8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (340, 256) for f in frames)
    n = len(reference)
    for i, frame in enumerate(frames):
        assert np.array_equal(np.asarray(frame), reference[int((i + 0.5) * n / 8)]), i


def test_mkv_without_frame_count(tmp_path):
    # Matroska stores no frame count: the reader counts packets. Remux the mp4 (stream copy, same pictures).
    with av.open(str(VIDEO / "short_32frames.mp4")) as source, av.open(str(tmp_path / "clip.mkv"), "w") as sink:
        stream = sink.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                sink.mux(packet)
    with av.open(str(tmp_path / "clip.mkv")) as check:
        assert check.streams.video[0].frames == 0
    reference = all_frames_av(VIDEO / "short_32frames.mp4")
    frames = load_video(tmp_path / "clip.mkv", num_frames=8)
    assert [np.array_equal(np.asarray(f), reference[4 * i + 2]) for i, f in enumerate(frames)] == [True] * 8


def test_without_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    for loader, path in [(load_audio, AUDIO / "speech_16k.flac"), (load_video, VIDEO / "short_32frames.mp4")]:
        assert "pip install av" in expect_media_error(loader, path)
    assert load_audio(AUDIO / "speech_16k_mono.wav").shape == (52173,)  # WAV needs no PyAV
    frames = [Image.new("RGB", (8, 8), colour(i)) for i in range(3)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    assert len(load_video(tmp_path / "clip.gif", num_frames=4)) == 4
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"{i}.png")
    assert len(load_video(tmp_path, num_frames=4)) == 4


def test_short_clip_repeats_frames():
    reference = all_frames_av(VIDEO / "short_32frames.mp4")
    frames = load_video(VIDEO / "short_32frames.mp4", num_frames=64)
    assert len(frames) == 64
    for i in (0, 1, 62, 63):  # centres of 64 segments over 32 frames: 0, 0, 31, 31
        assert np.array_equal(np.asarray(frames[i]), reference[i // 2])


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i, 255 - 10 * i, (37 * i) % 256)


def test_gif_frames(tmp_path):
    frames = [Image.new("RGB", (24, 16), colour(i)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    out = load_video(tmp_path / "clip.gif", num_frames=8)
    assert len(out) == 8 and all(f.mode == "RGB" and f.size == (24, 16) for f in out)
    # centres of 8 segments over 5 frames: floor((i + 0.5) * 5 / 8)
    for got, index in zip(out, [0, 0, 1, 2, 2, 3, 4, 4]):
        assert np.abs(np.asarray(got)[0, 0].astype(int) - colour(index)).max() <= 8  # GIF palette quantisation


@pytest.mark.parametrize("count,expected", [(20, [1, 3, 6, 8, 11, 13, 16, 18]), (3, [0, 0, 0, 1, 1, 2, 2, 2])])
def test_folder_of_frames(tmp_path, count, expected):
    rng = np.random.default_rng(0)
    for i in rng.permutation(count):  # written out of order: the reader sorts by name
        Image.new("RGB", (12, 10), colour(i)).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    out = load_video(tmp_path, num_frames=8)
    assert [tuple(np.asarray(f)[0, 0]) for f in out] == [colour(i) for i in expected]


# ---- bad input ----

def expect_media_error(loader, path):
    with pytest.raises(MediaError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_missing_empty_and_odd_paths(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "empty.mp4").write_bytes(b"")
    for loader, name in [(load_image, "empty.jpg"), (load_audio, "empty.wav"), (load_video, "empty.mp4")]:
        assert "empty file" in expect_media_error(loader, tmp_path / name)
        assert "no such file" in expect_media_error(loader, tmp_path / ("missing_" + name))
    assert "not a regular file" in expect_media_error(load_image, tmp_path)
    (tmp_path / "frames").mkdir()
    assert "no frame images" in expect_media_error(load_video, tmp_path / "frames")
    assert "no video stream" in expect_media_error(load_video, AUDIO / "speech_16k.flac")
    assert "no audio stream" in expect_media_error(load_audio, VIDEO / "short_32frames.mp4")


def test_fuzz_truncated_random_and_wrong_files(tmp_path):
    loaders = {".jpg": load_image, ".png": load_image, ".wav": load_audio, ".flac": load_audio,
               ".mp4": load_video, ".gif": load_video}
    gif = tmp_path / "source.gif"
    frames = [Image.new("RGB", (24, 16), colour(i)) for i in range(4)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    sources = sorted(p for d in (IMAGES, AUDIO, VIDEO) for p in d.iterdir()) + [gif]
    rng = np.random.default_rng(1234)
    checked = 0
    for source in sources:
        data = source.read_bytes()
        loader = loaders[source.suffix]
        for fraction in (0.001, 0.05, 0.3, 0.6, 0.95):
            cut = tmp_path / f"cut_{fraction}_{source.name}"
            cut.write_bytes(data[:max(1, int(len(data) * fraction))])
            expect_media_error(loader, cut)
            checked += 1
        # random bytes, bare and behind the real file's first bytes (its magic number and header)
        for keep in (0, 16, 64):
            noise = tmp_path / f"noise_{keep}_{source.name}"
            noise.write_bytes(data[:keep] + rng.integers(0, 256, int(rng.integers(1, 3000)), np.uint8).tobytes())
            expect_media_error(loader, noise)
            checked += 1
    # a real file of the wrong kind
    expect_media_error(load_image, AUDIO / "speech_16k_mono.wav")
    expect_media_error(load_audio, IMAGES / "hopper.jpg")
    expect_media_error(load_video, AUDIO / "speech_16k_mono.wav")
    assert checked == 8 * len(sources)


def test_video_with_non_utf8_metadata(tmp_path):
    # older encoders and phone apps write tags in Latin-1 or other code pages: here the mp4's encoder tag (udta ilst
    # ©too) patched in place, same length, to hold the byte 0xe9
    data = (VIDEO / "short_32frames.mp4").read_bytes()
    assert data.count(b"Lavf58.12.100") == 1
    path = tmp_path / "latin1_tag.mp4"
    path.write_bytes(data.replace(b"Lavf58.12.100", b"Lavf58.12.1\xe9\xe9"))
    with pytest.raises(UnicodeDecodeError):  # the file really trips PyAV's default strict decoding
        av.open(str(path)).close()
    reference = all_frames_av(VIDEO / "short_32frames.mp4")
    frames = load_video(path, num_frames=8)
    assert [np.array_equal(np.asarray(f), reference[4 * i + 2]) for i, f in enumerate(frames)] == [True] * 8


@pytest.mark.parametrize("suffix,codec", [(".flac", "flac"), (".m4a", "aac")])
def test_audio_with_non_utf8_metadata(tmp_path, suffix, codec):
    clean, patched = tmp_path / f"clean{suffix}", tmp_path / f"latin1_tag{suffix}"
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    with av.open(str(clean), "w") as container:
        container.metadata["title"] = "Cafe au lait"
        stream = container.add_stream(codec, rate=16000, layout="mono")
        sample_format = stream.codec_context.codec.audio_formats[0].name  # flac: s16 or s32, aac: fltp
        samples = tone[None] if sample_format == "fltp" else np.rint(tone[None] * 32767).astype(np.int16)
        if sample_format.startswith("s32"):
            samples = samples.astype(np.int32) << 16
        frame = av.AudioFrame.from_ndarray(samples, format=sample_format, layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    data = clean.read_bytes()
    assert data.count(b"Cafe au lait") == 1
    patched.write_bytes(data.replace(b"Cafe au lait", b"Caf\xe9 au lait"))  # Latin-1, same length
    with pytest.raises(UnicodeDecodeError):
        av.open(str(patched)).close()
    out = load_audio(patched)
    assert torch.equal(out, load_audio(clean)) and len(out) > 15000


def text_file(path):
    path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    return path


@pytest.mark.parametrize("with_pyav", [True, False])
def test_files_that_are_not_media_say_what_is_read(tmp_path, monkeypatch, with_pyav):
    if not with_pyav:
        monkeypatch.setitem(sys.modules, "av", None)  # the messages must not turn into a PyAV install hint
    bare, txt = text_file(tmp_path / "passwd"), text_file(tmp_path / "notes.txt")
    message = expect_media_error(load_audio, bare)
    assert message == (f"{bare}: not a WAV file, and its name has no suffix naming an audio format epalm reads: "
                       ".wav .flac .mp3 .ogg .opus .m4a .aac, or the sound of a video "
                       "(.mp4 .m4v .mov .avi .webm .mkv .mpg .mpeg .3gp)")
    assert f"{txt}: not a WAV file, and '.txt' is not an audio format" in expect_media_error(load_audio, txt)
    message = expect_media_error(load_video, txt)
    assert message == (f"{txt}: '.txt' is not a video format epalm reads: .mp4 .m4v .mov .avi .webm .mkv .mpg .mpeg "
                       ".3gp, animations (.gif .apng .webp .png) or a folder of frame images")
    assert f"{bare}: its name has no suffix naming a video format epalm reads: .mp4" in expect_media_error(load_video,
                                                                                                          bare)
    for path in (bare, txt):
        assert expect_media_error(load_image, path).startswith(f"{path}: a text file, not an image (Pillow reads")
    binary = tmp_path / "random.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert expect_media_error(load_image, binary).startswith(f"{binary}: not an image or unsupported image format")
    assert "'.bin' is not an audio format" in expect_media_error(load_audio, binary)
