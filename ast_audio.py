"""AST, the Audio Spectrogram Transformer (Gong et al., 2021): a ViT over the log-mel spectrogram.

Overlapping 16x16 patches (strides from the config, 10x10 for the AudioSet checkpoint: 12x101 patches for 128x1024),
a [CLS] and a distillation token, then ViT blocks. eP-ALM injects token 0, the [CLS] (not the cls/distillation
average AST's own classifier uses). Its input comes from the front end in fbank.py.

References: github.com/YuanGongND/ast; transformers' ASTModel (test reference only).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

import hub
from encoder_parts import HF_RULES, Block, check_model_type, config_from_dict, fuse_qkv, rename_keys, run_blocks
from fbank import AST_MEAN, AST_SAMPLE_RATE, AST_STD, preprocess


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
    feature_mean: float = AST_MEAN  # the fbank's normalisation: preprocessor_config.json's mean / std
    feature_std: float = AST_STD

    @classmethod
    def from_dict(cls, d: dict) -> "ASTConfig":
        return config_from_dict(cls, d)


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
        c = self.config
        return torch.stack([preprocess(torch.as_tensor(w, dtype=torch.float32), AST_SAMPLE_RATE, c.max_length,
                                       c.feature_mean, c.feature_std) for w in waveforms])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None,
                        quantization=None) -> "AST":
        folder = hub.resolve(name_or_path, extra_files=("preprocessor_config.json",))
        raw = hub.read_json(folder)
        check_model_type(folder, raw, ("audio-spectrogram-transformer",), "an audio encoder (AST)")
        config = ASTConfig.from_dict(raw)
        processor = hub.read_json(folder, "preprocessor_config.json", required=False) or {}
        if processor.get("do_normalize", True):
            config = dataclasses.replace(config, feature_mean=processor.get("mean", AST_MEAN),
                                         feature_std=processor.get("std", AST_STD))
        rules = [(r"^embeddings\.distillation_token$", "dist_token")] + HF_RULES
        state = rename_keys(fuse_qkv(hub.load_state_dict(folder)), rules,
                            prefixes=("audio_spectrogram_transformer.",), drop=("classifier.",))
        return hub.build(cls, config, state, dtype, shard, str(folder), quantization)
