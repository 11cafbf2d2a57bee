"""The audio front end of AST: band-limited resampling to 16 kHz, Kaldi's log-mel filterbank, AudioSet normalisation.

fbank() computes what torchaudio.compliance.kaldi.fbank computes for AST (htk_compat, hanning window, no dither,
no energy, snip_edges), rewritten in plain torch, in float64, returned as float32. resample() is a Kaiser-windowed
sinc low-pass. preprocess() makes the (frames, 128) input the AST checkpoints were trained on; media.py resamples
decoded audio with resample().

References: Kaldi's feature-fbank / mel-computations (kaldi-asr.org) and torchaudio.compliance.kaldi.fbank;
github.com/YuanGongND/ast (the normalisation statistics); transformers' ASTFeatureExtractor (test reference only);
J. O. Smith, "Digital Audio Resampling" (ccrma.stanford.edu/~jos/resample) for the windowed sinc.
"""
import math

import torch

AST_SAMPLE_RATE = 16000
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet statistics of the fbank, from the AST repository
WINDOW_SAMPLES = AST_SAMPLE_RATE * 25 // 1000  # one 25 ms fbank window


def kaldi_mel_banks(num_mel_bins: int, fft_size: int, sample_rate: int, low_freq: float = 20.0) -> torch.Tensor:
    """(fft_size // 2 + 1, num_mel_bins) triangles, evenly spaced and triangular on Kaldi's mel scale."""
    def mel(hz):
        return 1127.0 * torch.log1p(hz / 700.0)
    nyquist = sample_rate / 2
    if not 0 <= low_freq < nyquist:
        raise ValueError(f"fbank: low_freq {low_freq} Hz must lie in [0, {nyquist}) for sample_rate {sample_rate}")
    low_mel, high_mel = mel(torch.tensor([low_freq, nyquist], dtype=torch.float64)).tolist()
    edges = torch.linspace(low_mel, high_mel, num_mel_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Kaldi leaves the Nyquist bin out of every triangle: its column stays zero
    bin_mel = mel(torch.arange(fft_size // 2, dtype=torch.float64) * sample_rate / fft_size)
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([banks, torch.zeros(num_mel_bins, 1, dtype=torch.float64)], dim=1).T


def fbank(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
          frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> torch.Tensor:
    """Log-mel filterbank (frames, num_mel_bins) of a 1-D waveform, as Kaldi/torchaudio compute it for AST."""
    if waveform.dim() != 1:
        raise ValueError(f"fbank: waveform must be 1-D (samples,), got shape {tuple(waveform.shape)}")
    frame_length = int(sample_rate * frame_length_ms * 0.001)
    frame_shift = int(sample_rate * frame_shift_ms * 0.001)
    if frame_length < 2 or frame_shift < 1:
        raise ValueError(f"fbank: sample_rate {sample_rate} gives frames of {frame_length} samples, too short")
    if waveform.numel() < frame_length:
        raise ValueError(f"fbank: waveform has {waveform.numel()} samples, shorter than one "
                         f"{frame_length}-sample frame ({frame_length_ms} ms at {sample_rate} Hz)")
    fft_size = 1 << (frame_length - 1).bit_length()  # round_to_power_of_two
    frames = waveform.to(torch.float64).unfold(0, frame_length, frame_shift)  # snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove_dc_offset
    # pre-emphasis 0.97; Kaldi's first sample is emphasised against itself
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(frame_length, periodic=False, dtype=torch.float64)  # Kaldi "hanning"
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)
    mel_energy = power @ kaldi_mel_banks(num_mel_bins, fft_size, sample_rate)
    return mel_energy.clamp(min=torch.finfo(torch.float32).eps).log().to(torch.float32)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16,
             rolloff: float = 0.945, beta: float = 8.6) -> torch.Tensor:
    """Band-limited resampling of a 1-D signal with a Kaiser-windowed sinc low-pass at rolloff * min Nyquist.

    Output sample j sits at input time j * orig_rate / new_rate; it is the sum of the input samples within
    zero_crossings lobes of the sinc, weighted by the kernel centred there (exact integer time arithmetic).
    """
    if waveform.dim() != 1:
        raise ValueError(f"resample: waveform must be 1-D (samples,), got shape {tuple(waveform.shape)}")
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return waveform.to(torch.float32)
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    cutoff = 0.5 * rolloff * min(up, down) / down  # cycles per input sample
    half_width = math.ceil(zero_crossings / (2 * cutoff))  # taps on each side, in input samples
    offsets = torch.arange(-half_width, half_width + 2)

    def kernel(frac):  # (len(frac), taps) weights of outputs lying frac (0..1) input samples after their base
        t = frac[:, None] - offsets[None, :]
        window = torch.special.i0(beta * torch.sqrt(torch.clamp(1 - (t / half_width) ** 2, min=0.0)))
        window = torch.where(t.abs() <= half_width, window / torch.special.i0(torch.tensor(beta)), 0.0)
        return 2 * cutoff * torch.sinc(2 * cutoff * t) * window

    taps = offsets.numel()
    num_out = math.ceil(waveform.numel() * up / down)
    x = torch.nn.functional.pad(waveform.to(torch.float64), (half_width, half_width + 1 + down))
    if up * (down + taps) <= 2 ** 22:
        # polyphase: output q * up + r reads inputs from q * down + first[r], always with the same weights, so
        # one strided convolution with `up` kernels computes them all
        r = torch.arange(up)
        first, phase = (r * down) // up, (r * down) % up
        bank = torch.zeros(up, down + taps, dtype=torch.float64)
        bank[r[:, None], first[:, None] + torch.arange(taps)] = kernel(phase.to(torch.float64) / up)
        out = torch.nn.functional.conv1d(x[None, None], bank[:, None], stride=down)[0]
        return out.T.reshape(-1)[:num_out].to(torch.float32)
    # rates with a huge least common multiple: gather the taps of each output, a chunk at a time
    out = torch.empty(num_out, dtype=torch.float64)
    chunk = max(1, 2 ** 22 // taps)
    for start in range(0, num_out, chunk):
        j = torch.arange(start, min(start + chunk, num_out), dtype=torch.int64)
        base, phase = (j * down) // up, (j * down) % up
        weights = kernel(phase.to(torch.float64) / up)
        out[start:start + j.numel()] = (x[base[:, None] + offsets[None, :] + half_width] * weights).sum(dim=1)
    return out.to(torch.float32)


def preprocess(waveform: torch.Tensor, sample_rate: int, target_length: int = 1024, mean: float = AST_MEAN,
               std: float = AST_STD) -> torch.Tensor:
    """AST input (target_length, 128): 16 kHz, mean removed, fbank, zero-padded or cut, normalised with the
    checkpoint's statistics (AudioSet's by default). A clip shorter than one 25 ms window is zero-padded to one,
    as the official front end pads the spectrogram to 1024 frames: it gives one frame, then padding."""
    if sample_rate != AST_SAMPLE_RATE:
        waveform = resample(waveform, sample_rate, AST_SAMPLE_RATE)
    waveform = waveform.to(torch.float32)
    waveform = torch.nn.functional.pad(waveform - waveform.mean(), (0, max(0, WINDOW_SAMPLES - waveform.numel())))
    features = fbank(waveform, AST_SAMPLE_RATE, num_mel_bins=128)
    features = features[:target_length]
    features = torch.nn.functional.pad(features, (0, 0, 0, target_length - features.shape[0]))
    return (features - mean) / (std * 2)
