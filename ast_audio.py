"""AST, the Audio Spectrogram Transformer (Gong et al., 2021), and its Kaldi-compatible front end.

References: github.com/YuanGongND/ast; transformers' ASTModel and ASTFeatureExtractor (test references only).
"""
# ---- front end: fbank, preprocess (section owned by the media/front-end work) ----
# Kaldi's fbank as torchaudio.compliance.kaldi.fbank computes it for AST (htk_compat, hanning window, no dither,
# no energy, snip_edges), rewritten in plain torch. Computed in float64, returned as float32.
import math

import torch

AST_SAMPLE_RATE = 16000
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet statistics of the fbank, from the AST repository


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


def preprocess(waveform: torch.Tensor, sample_rate: int, target_length: int = 1024) -> torch.Tensor:
    """AST input (target_length, 128): 16 kHz, mean removed, fbank, zero-padded or cut, AudioSet-normalised."""
    if sample_rate != AST_SAMPLE_RATE:
        waveform = resample(waveform, sample_rate, AST_SAMPLE_RATE)
    waveform = waveform.to(torch.float32)
    features = fbank(waveform - waveform.mean(), AST_SAMPLE_RATE, num_mel_bins=128)
    features = features[:target_length]
    features = torch.nn.functional.pad(features, (0, 0, 0, target_length - features.shape[0]))
    return (features - AST_MEAN) / (AST_STD * 2)


# ---- model: AST (section owned by the encoder work) ----
# A ViT over the (frames, mel) spectrogram: overlapping 16x16 patches (strides from the config, 10x10 for the
# AudioSet checkpoint: 12x101 patches for 128x1024), a [CLS] and a distillation token, then ViT blocks. eP-ALM
# injects token 0, the [CLS] (not the cls/distillation average AST's own classifier uses).
import re
from dataclasses import dataclass

import torch.nn as nn

import hub
from encoder_parts import HF_RULES, Block, config_from_dict, fuse_qkv, rename_keys, run_blocks


@dataclass
class ASTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12  # HF checkpoints; the original AST code uses 1e-6: always read config.json
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024  # spectrogram frames
    num_mel_bins: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> "ASTConfig":
        return config_from_dict(cls, d)

    @classmethod
    def from_name(cls, name: str) -> "ASTConfig":
        # "ast-base" or "MIT/ast-finetuned-audioset-{fstride}-{tstride}-{mAP}"
        short = name.split("/")[-1]
        if short == "ast-base":
            return cls()
        m = re.fullmatch(r"ast-finetuned-audioset-(\d+)-(\d+)-[\d.]+", short)
        if m is None:
            raise ValueError(f"unknown AST name {name!r} (expected 'ast-base' or "
                             "'MIT/ast-finetuned-audioset-10-10-0.4593')")
        return cls(frequency_stride=int(m.group(1)), time_stride=int(m.group(2)))


class AST(nn.Module):
    def __init__(self, config: ASTConfig):
        super().__init__()
        self.config = c = config
        self.hidden_size = D = c.hidden_size
        self.grid = ((c.num_mel_bins - c.patch_size) // c.frequency_stride + 1,
                     (c.max_length - c.patch_size) // c.time_stride + 1)  # (frequency, time) patches
        self.patch_embed = nn.Conv2d(1, D, c.patch_size, stride=(c.frequency_stride, c.time_stride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 2, D))
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        if x.ndim != 3 or x.shape[1:] != (self.config.max_length, self.config.num_mel_bins):
            raise ValueError(f"AST input must be (B, {self.config.max_length}, {self.config.num_mel_bins}) "
                             f"(frames, mel bins), got {tuple(x.shape)} (run preprocess first)")
        B = x.shape[0]
        x = self.patch_embed(x.transpose(1, 2).unsqueeze(1)).flatten(2).transpose(1, 2)  # frequency-major
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], 1) + self.pos_embed
        return run_blocks(self.layers, self.norm, x, last)

    def preprocess(self, waveforms: list) -> torch.Tensor:
        """A list of 1-D float waveforms at 16 kHz -> (B, max_length, 128) normalised fbank features."""
        if not isinstance(waveforms, (list, tuple)) or not waveforms:
            raise TypeError("AST.preprocess expects a non-empty list of 1-D waveforms at 16 kHz")
        if self.config.num_mel_bins != 128:
            raise ValueError(f"AST.preprocess computes 128 mel bins, the config has {self.config.num_mel_bins}")
        return torch.stack([preprocess(torch.as_tensor(w, dtype=torch.float32), AST_SAMPLE_RATE,
                                       self.config.max_length) for w in waveforms])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None) -> "AST":
        folder = hub.resolve(name_or_path)
        config = ASTConfig.from_dict(hub.read_json(folder))
        rules = [(r"^embeddings\.distillation_token$", "dist_token")] + HF_RULES
        state = rename_keys(fuse_qkv(hub.load_state_dict(folder)), rules,
                            prefixes=("audio_spectrogram_transformer.",), drop=("classifier.",))
        with torch.device("meta"):
            model = cls(config)
        if shard is not None:  # e.g. FSDP units, before any weight is read (train.py)
            shard(model)
        hub.load_weights(model, state, dtype or torch.float32, source=str(folder))
        return model.eval()
