"""OPT, the frozen language model of eP-ALM, and its GPT-2 byte-level BPE tokenizer.

A decoder-only transformer with learned positions (offset 2), pre-LayerNorm layers (post-LayerNorm for
opt-350m, which also projects 512-d word embeddings in and out of its 1024-d residual stream) and an LM head
tied to the token embedding. Loads the official `facebook/opt-*` checkpoints. Also the pieces every LM here
shares (llama.py imports them): position_ids, causal_mask and the preallocated KVCache.

References:
- Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", arXiv:2205.01068.
- facebook/opt-* config.json and checkpoint layout on the Hugging Face hub.
- karpathy/nanoGPT and pytorch-labs/gpt-fast for the shape of the code.
"""
import dataclasses
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hub

POSITION_OFFSET = 2  # fairseq reserved two rows of the position table; checkpoints keep them
OPT_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    remove_final_layer_norm: bool = False  # "_remove_final_layer_norm" in config.json; False for all official sizes

    @classmethod
    def from_dict(cls, d: dict) -> "OPTConfig":
        d = dict(d)
        if "_remove_final_layer_norm" in d:
            d["remove_final_layer_norm"] = d["_remove_final_layer_norm"]
        if d.get("word_embed_proj_dim") is None:  # older configs leave it out: no projection
            d["word_embed_proj_dim"] = d.get("hidden_size", cls.hidden_size)
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in fields})
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"OPT config: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        if config.activation_function not in OPT_ACTIVATIONS:
            raise ValueError(f"OPT config: activation_function {config.activation_function!r} is not one of "
                             f"{sorted(OPT_ACTIVATIONS)}")
        return config

    @classmethod
    def from_name(cls, name: str) -> "OPTConfig":
        short = name.split("/")[-1]
        if short not in OFFICIAL_SIZES:
            raise ValueError(f"OPT size {name!r} is unknown; known: {', '.join(OFFICIAL_SIZES)}")
        hidden, layers, heads = OFFICIAL_SIZES[short]
        config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden)
        if short == "opt-350m":
            config.update(word_embed_proj_dim=512, do_layer_norm_before=False)
        return cls.from_dict(config)


# name: (hidden_size, num_hidden_layers, num_attention_heads), from the official config.json files
OFFICIAL_SIZES = {
    "opt-125m": (768, 12, 12), "opt-350m": (1024, 24, 16), "opt-1.3b": (2048, 24, 32), "opt-2.7b": (2560, 32, 32),
    "opt-6.7b": (4096, 32, 32), "opt-13b": (5120, 40, 40), "opt-30b": (7168, 48, 56), "opt-66b": (9216, 64, 72),
}


def position_ids(attention_mask: Tensor) -> Tensor:
    """Text positions from 0, counted over the real tokens: left padding moves no token (pads get 0)."""
    mask = attention_mask.long()
    return (mask.cumsum(1) * mask - 1).clamp(min=0)


def causal_mask(valid: Tensor, query_pos: Tensor) -> Tensor:
    """Bool (B, 1, T, S) mask, True = may attend: keys are positions 0..S-1 and valid (B, S) says which exist;
    the query at query_pos[t] sees the valid keys at or before it, and always its own key, so that a padded
    query row softmaxes over something, not NaN."""
    key_pos = torch.arange(valid.shape[1], device=valid.device)
    q = query_pos[:, None]
    return (valid[:, None, None, :] & (key_pos <= q)) | (key_pos == q)


@dataclass
class KVCache:
    """One layer's keys and values, preallocated for a whole generation: (rows, heads, slots, head_dim). Written
    in place at given slots (a LongTensor, so a compiled step sees a tensor, not an int) and reordered in place:
    the buffers keep their addresses, as CUDA graphs need. One pair of buffers per layer, not views of a shared
    one: torch.compile updates a whole input in place, but rebuilds the base of a view it writes to. Unwritten
    slots hold zeros, not garbage: a masked key still multiplies its value by 0, and 0 * NaN is NaN."""
    k: Tensor
    v: Tensor

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (rows, heads, len(slots), head_dim) at slots; returns the whole buffers to attend over."""
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v

    @classmethod
    def zeros(cls, shape: tuple, dtype=None, device=None) -> "KVCache":
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def every(self, n: int) -> "KVCache":
        """Every n-th row (views: writes land in the buffers)."""
        return KVCache(self.k[::n], self.v[::n])

    def reorder(self, index: Tensor, start: int = 0, end: int | None = None) -> None:
        """Row r takes row index[r]'s keys and values, in slots [start, end) only."""
        for buf in (self.k, self.v):
            part = buf[:, :, start:end]
            part.copy_(part.index_select(0, index))


def new_cache(config: OPTConfig, rows: int, slots: int, dtype=None, device=None) -> list[KVCache]:
    """A zeroed KV cache for every layer."""
    shape = (rows, config.num_attention_heads, slots, config.hidden_size // config.num_attention_heads)
    return [KVCache.zeros(shape, dtype, device) for _ in range(config.num_hidden_layers)]


class OPTLayer(nn.Module):
    """One decoder layer: self-attention then an MLP (ReLU for every official size), each with a residual and a
    LayerNorm."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        d, bias, affine = config.hidden_size, config.enable_bias, config.layer_norm_elementwise_affine
        self.n_head = config.num_attention_heads
        self.pre_norm = config.do_layer_norm_before
        self.activation = OPT_ACTIVATIONS[config.activation_function]
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d, bias=bias)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def attention(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, slots: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:  # attend over every slot of the cache; the mask says which are there yet
            k, v = cache.write(slots, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None, rotary=None) -> Tensor:
        """x: new positions, stored at `slots` of the cache if there is one; mask None: causal over x alone.
        rotary: unused (OPT's positions enter once, in OPT.embed); there for the LM interface (model.py)."""
        if self.pre_norm:
            x = x + self.attention(self.self_attn_layer_norm(x), mask, cache, slots)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.attention(x, mask, cache, slots))  # opt-350m: post-LayerNorm
        return self.final_layer_norm(x + self.fc2(self.activation(self.fc1(x))))


class OPT(nn.Module):
    """Token + position embeddings, the decoder layers, and the LM head tied to the token embedding."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else nn.Identity()
        self.project_out = nn.Linear(d, e, bias=False) if e != d else nn.Identity()
        self.layers = nn.ModuleList(OPTLayer(config) for _ in range(config.num_hidden_layers))
        final_norm = config.do_layer_norm_before and not config.remove_final_layer_norm
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine) \
            if final_norm else nn.Identity()

    position_ids = staticmethod(position_ids)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Token-embedding-space vectors x (B, T, word_embed_proj_dim) at positions (B, T) into the residual
        stream. A negative position (the soft prompt, model.py) gets no position embedding: the table has none."""
        pos = self.embed_positions(positions.clamp(min=0) + POSITION_OFFSET)
        return self.project_in(x) + torch.where((positions >= 0)[..., None], pos, 0)

    def rotary(self, positions: Tensor) -> None:
        """What the layers need to know of positions: nothing, they entered in embed."""
        return None

    def new_cache(self, rows: int, slots: int, dtype=None, device=None) -> list[KVCache]:
        return new_cache(self.config, rows, slots, dtype, device)

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(self.project_out(self.final_layer_norm(h)), self.embed_tokens.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits of every position, without a cache (generation lives in generate.py)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None  # plain causal
        else:
            position_ids = self.position_ids(attention_mask)
            mask = causal_mask(attention_mask.bool(), torch.arange(T, device=input_ids.device))
        x = self.embed(self.embed_tokens(input_ids), position_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.logits(x)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, shard=None,
                        quantization=None) -> "OPT":
        folder = hub.resolve(name_or_path)
        config = OPTConfig.from_dict(hub.read_json(folder))
        state = {}
        for key, tensor in hub.load_state_dict(folder).items():  # memory-mapped: load_weights casts and places
            if key == "lm_head.weight":  # tied to embed_tokens
                continue
            key = key.removeprefix("model.").removeprefix("decoder.").replace("self_attn.", "")
            state[key] = tensor
        return hub.build(cls, config, state, dtype, shard, str(folder), quantization)


def load_tokenizer(name_or_path: str):
    """OPT's tokenizer: GPT-2 byte-level BPE with OPT's ids, `</s>` (id 2) prepended as BOS, `<pad>` id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = pathlib.Path(hub.resolve(name_or_path, extra_files=("tokenizer.json", "vocab.json", "merges.txt")))
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing, and no tokenizer.json to use instead")
    tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])  # already in vocab.json: keeps their ids
    bos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B:1", special_tokens=[("</s>", bos)])
    return tokenizer
