"""The Llama family of decoders as eP-ALM's frozen language model: Llama 2 / 3.x, Qwen2 / 2.5, SmolLM2, Mistral.

One design: RMSNorm pre-norm layers, rotary positions (Llama 3's frequency scaling included), a SwiGLU MLP,
grouped-query attention (fewer key-value heads than query heads, shared through SDPA's enable_gqa rather than
copied per head), an LM head tied to the token embedding or not. The members differ only in config.json: Qwen2
adds a bias to q, k and v; Mistral's sliding window changes nothing for sequences shorter than it, so longer ones
are refused. Loads the official hub layout (config.json, generation_config.json, safetensors sharded or not) and
tokenizer.json; the same interface as opt.OPT (model.py's docstring lists it).

References:
- Touvron et al. 2023, "Llama 2" (arXiv:2307.09288); Llama Team 2024, "The Llama 3 Herd of Models"
  (arXiv:2407.21783), for the rope scaling; Qwen2 Technical Report (arXiv:2407.10671).
- Su et al. 2021, "RoFormer" (rotary positions); Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU);
  Ainslie et al. 2023, "GQA".
- transformers' modeling_llama.py / modeling_rope_utils.py (the layout and rotary convention matched by
  tests/test_llama.py); pytorch-labs/gpt-fast model.py for the shape of the code.
"""
import math
import pathlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hub
from opt import KVCache, causal_mask, position_ids

MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])  # generation stops at any of them
    pad_token_id: int = 2  # the checkpoint's, else its first EOS: padding is always masked

    @classmethod
    def from_dict(cls, d: dict, generation: dict | None = None) -> "LlamaConfig":
        """From config.json (and generation_config.json, whose EOS list wins, as in Llama 3.1)."""
        kind = d.get("model_type")
        if kind not in MODEL_TYPES:
            raise ValueError(f"config.json: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not silu")
        heads = d["num_attention_heads"]
        # transformers 5 writes rope_parameters; the official files carry rope_theta and rope_scaling
        rope = dict(d.get("rope_parameters") or {**(d.get("rope_scaling") or {}),
                                                  "rope_theta": d.get("rope_theta", 10000.0)})
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))  # older files say "type"
        if rope["rope_type"] not in ("default", "llama3"):
            raise ValueError(f"config.json: rope type {rope['rope_type']!r} is not supported (default, llama3)")
        limit = d.get("max_position_embeddings", cls.max_position_embeddings)
        window = d.get("sliding_window") if kind == "mistral" or d.get("use_sliding_window") else None
        ids = {k: (generation or {}).get(k, d.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        eos = ids["eos_token_id"] if isinstance(ids["eos_token_id"], list) else [ids["eos_token_id"]]
        if eos == [None]:
            raise ValueError("config.json: no eos_token_id (nor in generation_config.json)")
        attention_bias = d.get("attention_bias", False)
        config = cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=min(limit, window) if window else limit,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope=rope,
            qkv_bias=kind == "qwen2" or attention_bias, out_bias=kind != "qwen2" and attention_bias,
            mlp_bias=d.get("mlp_bias", False), tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=eos[0] if ids["bos_token_id"] is None else ids["bos_token_id"],  # no BOS: EOS, as OPT
            eos_token_id=eos, pad_token_id=eos[0] if ids["pad_token_id"] is None else ids["pad_token_id"])
        if heads % config.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{config.num_key_value_heads}")
        return config


def rope_frequencies(config: LlamaConfig, device=None) -> Tensor:
    """The rotary inverse frequencies (head_dim / 2,), float32; Llama 3 stretches the low ones (by `factor`) and
    blends the middle band, as transformers' _compute_llama3_parameters."""
    rope, dim = config.rope, config.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    if rope["rope_type"] != "llama3":
        return inv_freq
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, head_dim) turned by the angles of its positions; the two halves of head_dim are the pairs
    (transformers' layout, which the checkpoints' q and k weights are permuted for)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaLayer(nn.Module):
    """One decoder layer: RMSNorm, grouped-query self-attention with rotary positions, RMSNorm, SwiGLU MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=config.out_bias)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)

    def attention(self, x: Tensor, mask, cache: KVCache | None, slots, rotary: tuple[Tensor, Tensor]) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, -1).transpose(1, 2)
        cos, sin = (r.to(x.dtype)[:, None] for r in rotary)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # keys are cached turned: a slot keeps its position
        if cache is not None:
            k, v = cache.write(slots, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None, rotary: tuple[Tensor, Tensor] = None) -> Tensor:
        """As opt.OPTLayer; rotary: (cos, sin) of x's positions, from Llama.rotary."""
        x = x + self.attention(self.input_layernorm(x), mask, cache, slots, rotary)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Token embedding, the decoder layers, a final RMSNorm and the LM head (tied to the embedding or not)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    position_ids = staticmethod(position_ids)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """The residual stream starts as the token embeddings: positions act in every layer (rotary)."""
        return x

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) (B, T, head_dim) of positions (B, T), float32, any integers (only differences reach
        attention); the frequencies are recomputed here, a few dozen numbers, so the model holds no buffer that
        loading on the meta device would have to fill."""
        angles = positions[..., None].float() * rope_frequencies(self.config, positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def new_cache(self, rows: int, slots: int, dtype=None, device=None) -> list[KVCache]:
        shape = (rows, self.config.num_key_value_heads, slots, self.config.head_dim)
        return [KVCache.zeros(shape, dtype, device) for _ in range(self.config.num_hidden_layers)]

    def logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)  # an untied head is called as a module: it may be quantized (quantize.py)
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits of every position, without a cache (generation lives in generate.py)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None  # plain causal
        else:
            positions = position_ids(attention_mask)
            mask = causal_mask(attention_mask.bool(), torch.arange(T, device=input_ids.device))
        x, rotary = self.embed_tokens(input_ids), self.rotary(positions)
        for layer in self.layers:
            x = layer(x, mask, rotary=rotary)
        return self.logits(x)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None,
                        quantization=None) -> "Llama":
        folder = hub.resolve(name_or_path, extra_files=("generation_config.json",))
        config = LlamaConfig.from_dict(hub.read_json(folder), hub.read_json(folder, "generation_config.json",
                                                                            required=False))
        state = {}
        for key, tensor in hub.load_state_dict(folder).items():  # memory-mapped: load_weights casts and places
            if key == "lm_head.weight" and config.tie_word_embeddings:  # some tied checkpoints store it too
                continue
            state[key.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")] = tensor
        return hub.build(cls, config, state, dtype, shard, str(folder), quantization)


@dataclass
class TextTokenizer:
    """tokenizer.json's tokenizer, with the ids eP-ALM's text layout needs (`<bos> prompt target <eos>`, left
    padded), which the checkpoint's config files say and tokenizer.json does not (data.text_batch reads them)."""
    tokenizer: object  # a tokenizers.Tokenizer
    bos_token_id: int
    eos_token_id: int  # the first of the LM's EOS ids: the one training appends
    pad_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def load_tokenizer(name_or_path: str) -> TextTokenizer:
    """The checkpoint's tokenizer.json as is (what transformers' fast tokenizer encodes), its BOS, EOS and pad
    ids from config.json and generation_config.json (LlamaConfig.from_dict)."""
    from tokenizers import Tokenizer

    folder = pathlib.Path(hub.resolve(name_or_path, extra_files=("tokenizer.json", "generation_config.json")))
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: missing (the Llama family ships its tokenizer so)")
    config = LlamaConfig.from_dict(hub.read_json(folder), hub.read_json(folder, "generation_config.json",
                                                                        required=False))
    return TextTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), config.bos_token_id,
                         config.eos_token_id[0], config.pad_token_id)
