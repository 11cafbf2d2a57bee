"""The Vision Transformer (ViT-B/16, ViT-L/16) as a frozen eP-ALM image encoder, plus the pieces the other encoders
share: the pre-LN transformer block, hub-key renaming, and the PIL image transform.

forward returns one (B, N, D) tensor per block, each passed through the final LayerNorm, so out[-1] is the usual
last_hidden_state and out[i][:, 0] is the [CLS] token that eP-ALM injects into the language model.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); transformers' ViTModel and
ViTImageProcessor and timm's VisionTransformer (read to match checkpoints and preprocessing, never imported here).
"""
import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import hub

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def config_from_dict(cls, d: dict):
    """Build a config dataclass from a hub config.json dict, ignoring keys the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for key in ("image_size", "patch_size"):  # hub configs may store [h, w]; these models are square
        if isinstance(kwargs.get(key), (list, tuple)):
            if len(set(kwargs[key])) != 1:
                raise ValueError(f"config.json: {key}={kwargs[key]} is not square, which is not supported")
            kwargs[key] = kwargs[key][0]
    if kwargs.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act={kwargs['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
    return cls(**kwargs)


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


# ---- the transformer block shared by ViT, AST and (in parts) TimeSformer ----

class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, qkv_bias: bool = True):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = Attention(D, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = MLP(D, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor, last: int | None, **kwargs) -> list:
    """Run every block; return the final-LN'd output of the last `last` blocks (all of them when None)."""
    n = len(blocks)
    last = n if last is None else last
    if not 1 <= last <= n:
        raise ValueError(f"last={last} must be between 1 and the number of blocks ({n})")
    outs = []
    for i, block in enumerate(blocks):
        x = block(x, **kwargs)
        if i >= n - last:
            outs.append(norm(x))
    return outs


# ---- checkpoint key renaming ----

# HF layout (ViTModel, ASTModel, TimesformerModel) -> ours; the first matching rule wins.
HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
# timm already uses our block names; only the patch embedding differs.
TIMM_RULES = [(r"^patch_embed\.proj\.", "patch_embed.")]


def fuse_qkv(state: dict) -> dict:
    """HF stores attention.attention.{query,key,value}; we use one fused qkv Linear (as timm and TimeSformer do)."""
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"(.*\.attention\.attention\.)(query|key|value)\.(weight|bias)", key)
        if m is None:
            out[key] = t
        elif m.group(2) == "query":
            parts = [state.get(f"{m.group(1)}{p}.{m.group(3)}") for p in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint has {key} but not all of query/key/value next to it")
            out[f"{m.group(1)}qkv.{m.group(3)}"] = torch.cat(parts, 0)
    return out


def rename_keys(state: dict, rules: list, prefixes: tuple = (), drop: tuple = ()) -> dict:
    """Strip a task-model prefix ("vit.", ...), drop heads, apply the first matching rule to every key. Keys that
    match nothing are kept as is, so the strict load names them."""
    out = {}
    for key, t in state.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        if key.startswith(drop):
            continue
        for pattern, repl in rules:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = t
    return out


# ---- deterministic eval transform (pure PIL + torch) ----

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


# ---- the model ----

class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.hidden_size = D = config.hidden_size
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, D, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.transform = ImageTransform(resize=(config.image_size, config.image_size))

    def forward(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        B, C, H, W = x.shape
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(f"ViT input is {H}x{W}, the checkpoint expects {self.config.image_size}x"
                             f"{self.config.image_size} (run preprocess first)")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.pos_embed
        return run_blocks(self.blocks, self.norm, x, last)

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
