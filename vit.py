"""The Vision Transformer (ViT-B/16, ViT-L/16) as a frozen eP-ALM image encoder, from HF or timm checkpoints.

forward returns one (B, N, D) tensor per block, each passed through the final LayerNorm, so out[-1] is the usual
last_hidden_state and out[i][:, 0] is the [CLS] token that eP-ALM injects into the language model. The block and
the HF key renaming are in encoder_parts.py, the image transform in media.py.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); transformers' ViTModel and
ViTImageProcessor and timm's VisionTransformer (read to match checkpoints and preprocessing, never imported here).
"""
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

import hub
from encoder_parts import HF_RULES, Block, config_from_dict, fuse_qkv, rename_keys, run_blocks
from media import ImageTransform, transform_from_hf, transform_from_timm, transform_image


@dataclass
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12  # HF checkpoints; timm's use 1e-6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        return config_from_dict(cls, d)

    @classmethod
    def from_name(cls, name: str) -> "ViTConfig":
        # "vit-base-patch16-224", "google/vit-large-patch16-224", timm's "vit_base_patch16_224.augreg_in21k_ft_in1k"
        sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                 "huge": (1280, 32, 16)}
        short = name.split("/")[-1]
        m = re.fullmatch(r"vit[-_](tiny|small|base|large|huge)[-_]patch(\d+)[-_](\d+)([-_.].*)?", short)
        if m is None:
            raise ValueError(f"unknown ViT name {name!r} (expected like 'vit-base-patch16-224')")
        hidden, layers, heads = sizes[m.group(1)]
        return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=4 * hidden, patch_size=int(m.group(2)), image_size=int(m.group(3)),
                   layer_norm_eps=1e-6 if "_" in short else 1e-12)

    @classmethod
    def from_timm(cls, d: dict) -> "ViTConfig":
        """timm's config.json: the shapes follow from "architecture", overridden by "model_args"."""
        config = cls.from_name(d["architecture"])
        args = d.get("model_args", {})
        renames = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
                   "img_size": "image_size", "patch_size": "patch_size", "qkv_bias": "qkv_bias"}
        config = dataclasses.replace(config, **{renames[k]: v for k, v in args.items() if k in renames})
        return dataclasses.replace(config, intermediate_size=int(config.hidden_size * args.get("mlp_ratio", 4.0)))


# timm names the blocks as we do but calls the stack `blocks` (ours is `layers`, as the LM's).
TIMM_RULES = [(r"^patch_embed\.proj\.", "patch_embed."), (r"^blocks\.", "layers.")]


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.hidden_size = D = config.hidden_size
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, D))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.transform = ImageTransform(resize=(config.image_size, config.image_size))

    def forward(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        B, C, H, W = x.shape
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(f"ViT input is {H}x{W}, the checkpoint expects {self.config.image_size}x"
                             f"{self.config.image_size} (run preprocess first)")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.pos_embed
        return run_blocks(self.layers, self.norm, x, last)

    def preprocess(self, images: list) -> torch.Tensor:
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("ViT.preprocess expects a non-empty list of PIL images")
        return torch.stack([transform_image(im, self.transform) for im in images])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None) -> "ViT":
        folder = hub.resolve(name_or_path, extra_files=("preprocessor_config.json",))
        raw = hub.read_json(folder)
        state = hub.load_state_dict(folder)
        if "architecture" in raw:  # timm layout
            config = ViTConfig.from_timm(raw)
            state = rename_keys(state, TIMM_RULES, drop=("head.",))
        else:
            config = ViTConfig.from_dict(raw)
            state = rename_keys(fuse_qkv(state), HF_RULES, prefixes=("vit.",), drop=("pooler.", "classifier."))
        with torch.device("meta"):
            model = cls(config)
        if shard is not None:  # e.g. FSDP units, before any weight is read (train.py)
            shard(model)
        hub.load_weights(model, state, dtype or torch.float32, source=str(folder))
        processor = hub.read_json(folder, "preprocessor_config.json", required=False)
        if processor is not None:
            model.transform = transform_from_hf(processor, model.transform, int_size_is_square=True)
        elif "pretrained_cfg" in raw:
            model.transform = transform_from_timm(raw["pretrained_cfg"])
        return model.eval()
