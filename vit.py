"""The Vision Transformer (ViT-B/16, ViT-L/16) as a frozen eP-ALM image encoder, from HF or timm checkpoints;
also the vision tower of CLIP (openai/clip-vit-*) and DINOv2 (facebook/dinov2-small/base/large), which are this
ViT with a few config switches and other key names.

forward returns one (B, N, D) tensor per block, each passed through the final LayerNorm, so out[-1] is the usual
last_hidden_state (CLIP: see CLIP_RULES) and out[i][:, 0] is the [CLS] token that eP-ALM injects into the
language model. The block and the HF key renaming are in encoder_parts.py, the image transform in media.py.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); Radford et al., "Learning Transferable
Visual Models From Natural Language Supervision" (CLIP, ICML 2021); Oquab et al., "DINOv2: Learning Robust Visual
Features without Supervision" (TMLR 2024); transformers' ViTModel, CLIPVisionModel, Dinov2Model and their image
processors, and timm's VisionTransformer (read to match checkpoints and preprocessing, never imported here).
"""
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import hub
from encoder_parts import HF_RULES, Block, check_model_type, config_from_dict, fuse_qkv, rename_keys, run_blocks
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
    patch_bias: bool = True  # CLIP's patch embedding has none
    norm_embeddings: bool = False  # CLIP: a LayerNorm on the embeddings before the first block
    layer_scale: bool = False  # DINOv2: each residual branch scaled by a learned vector
    interpolate_pos_embed: bool = False  # DINOv2: position grid resized to any input size

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

# CLIPModel (text + vision: only `vision_model.*` is kept) or CLIPVisionModel, after fuse_qkv. "Through the final
# norm" means through `post_layernorm`, which CLIP applies only to the pooled [CLS] (its pooler_output); its
# last_hidden_state is the last block's raw output. So out[i][:, 0] is block i's [CLS] as CLIP would pool it, and
# `pre_layrnorm` (sic), run on the embeddings before the first block, is our norm_embeddings.
CLIP_RULES = [
    (r"^embeddings\.class_embedding$", "cls_token"),  # (D,): reshaped in read_clip
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),  # an nn.Embedding's (N + 1, D): reshaped too
    (r"^embeddings\.patch_embedding\.", "patch_embed."),
    (r"^pre_layrnorm\.", "norm_embeddings."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"layers.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"layers.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.proj."),
    (r"^encoder\.layers\.", "layers."),  # mlp.fc1, mlp.fc2 as ours
    (r"^post_layernorm\.", "norm."),
]
CLIP_DROP = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "embeddings.position_ids")
# Dinov2Model: the ViT's HF names, plus layer scale; its blocks call their norms and MLP as ours do.
DINOV2_RULES = [(r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"layers.\1.ls\2"), *HF_RULES,
                (r"^encoder\.layer\.", "layers.")]
# Each processor's settings for a checkpoint without preprocessor_config.json (the official ones have it).
CLIP_TRANSFORM = ImageTransform(resize=None, shortest_edge=224, crop=(224, 224), resample=Image.Resampling.BICUBIC,
                                mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
DINOV2_TRANSFORM = ImageTransform(resize=None, shortest_edge=256, crop=(224, 224), resample=Image.Resampling.BICUBIC,
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def read_clip(raw: dict, state: dict) -> tuple[ViTConfig, dict]:
    """The config and our keys of a CLIPModel / CLIPVisionModel checkpoint's vision tower."""
    if raw["model_type"] == "clip" and not isinstance(raw.get("vision_config"), dict):
        raise ValueError("config.json: model_type 'clip' without a vision_config")
    d = raw["vision_config"] if raw["model_type"] == "clip" else raw
    config = ViTConfig.from_dict({"patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, **d,
                                  "patch_bias": False, "norm_embeddings": True})  # CLIPVisionConfig's defaults
    state = rename_keys(fuse_qkv(state, "self_attn", ("q_proj", "k_proj", "v_proj")), CLIP_RULES,
                        prefixes=("vision_model.",), drop=CLIP_DROP)
    for key in ("cls_token", "pos_embed"):
        if key in state:
            state[key] = state[key].reshape(1, -1, state[key].shape[-1])
    return config, state


def read_dinov2(raw: dict, state: dict) -> tuple[ViTConfig, dict]:
    """The config and our keys of a Dinov2Model (or Dinov2ForImageClassification) checkpoint."""
    if raw.get("use_swiglu_ffn"):
        raise ValueError("config.json: use_swiglu_ffn=true (DINOv2 giant) is not supported, only the plain MLP of "
                         "dinov2-small/base/large")
    d = {"patch_size": 14, "layer_norm_eps": 1e-6, **raw}  # Dinov2Config's defaults
    config = ViTConfig.from_dict({**d, "intermediate_size": int(d.get("hidden_size", 768) * d.get("mlp_ratio", 4)),
                                  "layer_scale": True, "interpolate_pos_embed": True})
    state = rename_keys(fuse_qkv(state), DINOV2_RULES, prefixes=("dinov2.",),
                        drop=("embeddings.mask_token", "classifier."))  # mask_token: masked pretraining only
    return config, state


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.hidden_size = D = config.hidden_size
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, D))
        self.norm_embeddings = nn.LayerNorm(D, eps=config.layer_norm_eps) if config.norm_embeddings else nn.Identity()
        self.layers = nn.ModuleList(Block(config, config.layer_scale) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.transform = ImageTransform(resize=(config.image_size, config.image_size))

    def forward(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        B, C, H, W = x.shape
        size, p = self.config.image_size, self.config.patch_size
        if not self.config.interpolate_pos_embed and (H != size or W != size):
            raise ValueError(f"ViT input is {H}x{W}, the checkpoint expects {size}x{size} (run preprocess first)")
        if H < p or W < p:
            raise ValueError(f"ViT input is {H}x{W}, smaller than one {p}x{p} patch")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.pos_embed_for(H // p, W // p)
        return run_blocks(self.layers, self.norm, self.norm_embeddings(x), last)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The position embeddings of an h x w patch grid: the stored ones at the checkpoint's size, else (DINOv2)
        its grid resized bicubically in float32, as Dinov2Model does (half-precision bicubic shifts them)."""
        n = self.config.image_size // self.config.patch_size
        if (h, w) == (n, n):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)

    def preprocess(self, images: list) -> torch.Tensor:
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("ViT.preprocess expects a non-empty list of PIL images")
        return torch.stack([transform_image(im, self.transform) for im in images])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None,
                        quantization=None) -> "ViT":
        folder = hub.resolve(name_or_path, extra_files=("preprocessor_config.json",))
        raw = hub.read_json(folder)
        check_model_type(folder, raw, ("vit", "clip", "clip_vision_model", "dinov2"), "an image encoder")
        state = hub.load_state_dict(folder)
        layout = raw.get("model_type")
        if "architecture" in raw:  # timm layout
            config = ViTConfig.from_timm(raw)
            state = rename_keys(state, TIMM_RULES, drop=("head.",))
        elif layout in ("clip", "clip_vision_model"):
            config, state = read_clip(raw, state)
        elif layout == "dinov2":
            config, state = read_dinov2(raw, state)
        else:
            config = ViTConfig.from_dict(raw)
            state = rename_keys(fuse_qkv(state), HF_RULES, prefixes=("vit.",), drop=("pooler.", "classifier."))
        model = hub.build(cls, config, state, dtype, shard, str(folder), quantization)
        processor = hub.read_json(folder, "preprocessor_config.json", required=False)
        if layout in ("clip", "clip_vision_model", "dinov2"):  # their processors read an int size as the short side
            default = DINOV2_TRANSFORM if layout == "dinov2" else CLIP_TRANSFORM
            model.transform = transform_from_hf(processor or {}, default, int_size_is_square=False)
        elif processor is not None:
            model.transform = transform_from_hf(processor, model.transform, int_size_is_square=True)
        elif "pretrained_cfg" in raw:
            model.transform = transform_from_timm(raw["pretrained_cfg"])
        return model
