"""TimeSformer-B (divided space-time attention) as a frozen eP-ALM video encoder.

Tokens: one [CLS] plus P patches per frame for T frames, ordered patch-major ([cls, p0t0, p0t1, ..., p1t0, ...]) as
in the checkpoints. Each block first lets every patch attend over its own T frames (temporal, [CLS] left out,
followed by an extra `temporal_fc` projection), then every frame attend over its P patches plus a copy of [CLS]
(spatial; the T [CLS] outputs are averaged), then the MLP. Clips with T != num_frames use time embeddings
interpolated with nearest neighbour, as the original code and transformers do.

References: Bertasius et al., "Is Space-Time Attention All You Need for Video Understanding?" (ICML 2021);
github.com/facebookresearch/TimeSformer; transformers' TimesformerModel and VideoMAEImageProcessor (read only).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub
from encoder_parts import HF_RULES, MLP, Attention, check_model_type, config_from_dict, rename_keys, run_blocks
from media import ImageTransform, transform_from_hf, transform_image


@dataclass
class TimeSformerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_frames: int = 8
    qkv_bias: bool = True
    attention_type: str = "divided_space_time"

    @classmethod
    def from_dict(cls, d: dict) -> "TimeSformerConfig":
        config = config_from_dict(cls, d)
        if config.attention_type != "divided_space_time":
            raise ValueError(f"config.json: attention_type={config.attention_type!r} is not supported "
                             "(only 'divided_space_time', the eP-ALM checkpoints' kind)")
        return config


# HF TimesformerModel keys -> ours, on top of the ViT rules for the spatial part
HF_TIMESFORMER_RULES = [
    (r"^embeddings\.time_embeddings$", "time_embed"),
    (r"^encoder\.layer\.(\d+)\.temporal_layernorm\.", r"layers.\1.temporal_norm1."),
    (r"^encoder\.layer\.(\d+)\.temporal_attention\.attention\.qkv\.", r"layers.\1.temporal_attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.temporal_attention\.output\.dense\.", r"layers.\1.temporal_attn.proj."),
    (r"^encoder\.layer\.(\d+)\.temporal_dense\.", r"layers.\1.temporal_fc."),
] + HF_RULES


class DividedBlock(nn.Module):
    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.temporal_norm1 = nn.LayerNorm(D, eps=eps)
        self.temporal_attn = Attention(D, config.num_attention_heads, config.qkv_bias)
        self.temporal_fc = nn.Linear(D, D)
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attn = Attention(D, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = MLP(D, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        B, N, D = x.shape
        T = num_frames
        P = (N - 1) // T
        cls, patches = x[:, :1], x[:, 1:]
        # temporal: rows are (batch, patch), each a sequence of T frames
        h = self.temporal_attn(self.temporal_norm1(patches.reshape(B * P, T, D)))
        patches = patches + self.temporal_fc(h.reshape(B, P * T, D))
        # spatial: rows are (batch, frame), each [cls] + P patches; cls sees every frame separately
        h = patches.reshape(B, P, T, D).transpose(1, 2).reshape(B * T, P, D)
        h = torch.cat([cls.expand(B, T, D).reshape(B * T, 1, D), h], 1)
        h = self.attn(self.norm1(h))
        cls_update = h[:, 0].reshape(B, T, D).mean(1, keepdim=True)
        patch_update = h[:, 1:].reshape(B, T, P, D).transpose(1, 2).reshape(B, P * T, D)
        # the spatial residual starts from the temporally updated patches but the original cls
        x = torch.cat([cls, patches], 1) + torch.cat([cls_update, patch_update], 1)
        return x + self.mlp(self.norm2(x))


class TimeSformer(nn.Module):
    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        self.config = config
        self.hidden_size = D = config.hidden_size
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, D))
        self.time_embed = nn.Parameter(torch.zeros(1, config.num_frames, D))
        self.layers = nn.ModuleList(DividedBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        s = config.image_size
        self.transform = ImageTransform(resize=None, shortest_edge=s, crop=(s, s), mean=(0.45,) * 3, std=(0.225,) * 3)

    def forward(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"TimeSformer input must be (B, T, 3, H, W), got shape {tuple(x.shape)}")
        B, T, C, H, W = x.shape
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(f"TimeSformer frames are {H}x{W}, the checkpoint expects {self.config.image_size}x"
                             f"{self.config.image_size} (run preprocess first)")
        x = self.patch_embed(x.reshape(B * T, C, H, W)).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        P, D = x.shape[1], x.shape[2]
        time = self.time_embed
        if T != time.shape[1]:
            time = F.interpolate(time.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
        x = x.reshape(B, T, P, D).transpose(1, 2) + time[:, None]  # (B, P, T, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x.reshape(B, P * T, D)], 1)
        return run_blocks(self.layers, self.norm, x, last, num_frames=T)

    def preprocess(self, clips: list) -> torch.Tensor:
        """A list of clips, each a list of PIL frames (all clips the same length) -> (B, T, 3, H, W)."""
        if not isinstance(clips, (list, tuple)) or not clips or not all(isinstance(c, (list, tuple)) for c in clips):
            raise TypeError("TimeSformer.preprocess expects a non-empty list of clips, each a list of PIL frames")
        if len({len(c) for c in clips}) != 1 or not clips[0]:
            raise ValueError(f"TimeSformer.preprocess: clips have different or zero frame counts "
                             f"{[len(c) for c in clips]}")
        return torch.stack([torch.stack([transform_image(f, self.transform) for f in c]) for c in clips])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None,
                        quantization=None) -> "TimeSformer":
        folder = hub.resolve(name_or_path, extra_files=("preprocessor_config.json",))
        raw = hub.read_json(folder)
        check_model_type(folder, raw, ("timesformer",), "a video encoder (TimeSformer)")
        config = TimeSformerConfig.from_dict(raw)
        state = rename_keys(hub.load_state_dict(folder), HF_TIMESFORMER_RULES, prefixes=("timesformer.",),
                            drop=("classifier.",))
        model = hub.build(cls, config, state, dtype, shard, str(folder), quantization)
        processor = hub.read_json(folder, "preprocessor_config.json", required=False)
        if processor is not None:
            model.transform = transform_from_hf(processor, model.transform, int_size_is_square=False)
        return model
