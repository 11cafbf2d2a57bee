"""What ViT (with CLIP's vision tower and DINOv2), AST and TimeSformer share: config.json reading, the pre-LN
transformer block, and the renaming of hub checkpoint keys to this project's parameter names.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021) for the block; Touvron et al., "Going
deeper with Image Transformers" (CaiT, ICCV 2021) for layer scale; transformers' ViTModel, CLIPVisionModel,
Dinov2Model, ASTModel and TimesformerModel and timm's VisionTransformer (read to match checkpoint keys, never
imported here).
"""
import dataclasses
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

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


# encoders people reach for that have no [CLS] token for eP-ALM to inject (the method needs one per level)
NO_CLS = dict.fromkeys(("siglip", "siglip_vision_model", "siglip2_vision_model"),
                       "SigLIP pools through an attention head, it has no [CLS] token to inject")


def check_model_type(folder, raw: dict, accepted: tuple[str, ...], what: str) -> None:
    """A one-line error when config.json's model_type is not one this encoder reads (e.g. an audio checkpoint
    given to --modality image), instead of a list of mismatched weights. A config without model_type passes."""
    kind = raw.get("model_type")
    if kind is not None and kind not in accepted:
        why = NO_CLS.get(kind, f"expected {', '.join(accepted)}")
        raise ValueError(f"{folder}: model_type {kind!r} is not {what}: {why}")


# ---- the pre-LN transformer block ----

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
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). With layer_scale (DINOv2) each branch is
    multiplied by a learned per-channel vector first: x + ls1 * attn(ln(x)), then x + ls2 * mlp(ln(x))."""

    def __init__(self, config, layer_scale: bool = False):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = Attention(D, config.num_attention_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = MLP(D, config.intermediate_size, config.hidden_act)
        self.ls1 = nn.Parameter(torch.ones(D)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(D)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + (a if self.ls1 is None else a * self.ls1)
        m = self.mlp(self.norm2(x))
        return x + (m if self.ls2 is None else m * self.ls2)


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
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.qkv\.", r"layers.\1.attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]


def fuse_qkv(state: dict, parent: str = "attention.attention", names: tuple = ("query", "key", "value")) -> dict:
    """HF stores {parent}.{query,key,value} (CLIP: self_attn.{q,k,v}_proj); we use one fused {parent}.qkv Linear
    (as timm and TimeSformer do)."""
    out = {}
    for key, t in state.items():
        m = re.fullmatch(rf"(.*\.{re.escape(parent)}\.)({'|'.join(map(re.escape, names))})\.(weight|bias)", key)
        if m is None:
            out[key] = t
        elif m.group(2) == names[0]:
            parts = [state.get(f"{m.group(1)}{p}.{m.group(3)}") for p in names]
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint has {key} but not all of {'/'.join(names)} next to it")
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
