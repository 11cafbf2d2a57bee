"""eP-ALM: a frozen language model given perception through late injection of encoder [CLS] tokens.

Shukor, Dancette, Cord, "eP-ALM: Efficient Perceptual Augmentation of Language Models", ICCV 2023.
Everything pretrained stays frozen. What trains is a linear connector (shared by the K encoder levels, or one
per level) and a soft prompt of P vectors. The encoder's last K blocks give K [CLS] tokens; the connector maps
each into M tokens of the LM's width; they enter the LM's late layers [start, end): the first level's are
prepended as M extra positions at layer `start`, each next level's overwrite them at a later layer (shallow
levels go to early layers), and the layers after the window carry those positions along.

M is 1 for OPT, as in eP-ALM. For an LM with grouped-query attention it is the number of query heads per
key-value head (2 for the toy Llama, 4 for Llama 3.2 1B, 6 for Qwen2.5 1.5B), so that one level offers each layer
as many values as multi-head attention would. Measured on the toy Llamas, more tokens help (image 79.8 -> 89.2 with
two), but toy Llamas with more key-value heads do not learn more from one token: a heuristic that helps, not a
derived rule (README, the toy Llama's fifth and sixth findings).

Sequence seen by the LM (left-padded text):   [media x M] [prompt x P] [pad ... pad] [text ...]
  - media: exists only from layer `start` on and attends only to the media slots (they come first, so plain
    causality gives exactly that: unlike the official code, it never sees future text or padding);
  - positions: text from 0 over its real tokens (padding moves nothing), the prompt just before it (-P..-1),
    the media tokens before that (-P-M..-P-1). OPT's learned table has no negative rows: prompt and media get
    no position, as in eP-ALM. Rotary positions (Llama) only reach attention as differences: the LM sees one
    contiguous run [media, prompt, text], as DePALM does and as in pretraining, where no two keys ever shared
    a position (one shared position would blur the inserted tokens together);
  - padding is never attended; every query attends to itself so padded rows stay finite.

The LM (opt.OPT, llama.Llama) offers: config (hidden_size, num_hidden_layers, max_position_embeddings,
pad_token_id, eos_token_id: one id or a list), embed_tokens (nn.Embedding; the soft prompt lives in its space),
embed(x, positions) -> h, rotary(positions) -> what its layers need of positions (None for OPT),
layers[i](h, mask, cache, slots, rotary) -> h, logits(h), new_cache(rows, slots, dtype, device) -> [KVCache].
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub
import llama
import opt
from ast_audio import AST
from generate import generate as generate_tokens
from opt import causal_mask, position_ids
from quantize import Quantization, parameter_count
from timesformer import TimeSformer
from vit import ViT


@dataclass
class EPALMConfig:
    num_levels: int = 6              # K: [CLS] tokens of the encoder's last K blocks
    inject_start: int | None = None  # LM layers [start, end) that receive them; None: 19..31 of 32, scaled
    inject_end: int | None = None
    shared_connector: bool = True    # one linear for all levels (the pt-L recipe) or one per level
    prompt_length: int = 10
    prompt_mlp: bool = False         # reparametrise the prompt through an MLP (the official default config)
    prompt_mlp_hidden: int = 512
    media_tokens: int | None = None  # tokens per level; None: the LM's query heads per key-value head


def injection_window(num_layers: int, num_levels: int, start=None, end=None) -> tuple[int, int]:
    """The LM layers [start, end) that receive the K tokens: OPT-2.7B's 19..31 of 32, scaled to the depth."""
    end = round(31 / 32 * num_layers) if end is None else end
    start = min(round(19 / 32 * num_layers), end - num_levels) if start is None else start
    if not 0 <= start < end <= num_layers or end - start < num_levels:
        raise ValueError(f"injection window [{start}, {end}) does not fit {num_levels} levels "
                         f"into an LM of {num_layers} layers")
    return start, end


class EPALM(nn.Module):
    def __init__(self, lm: nn.Module, encoder: nn.Module, config: EPALMConfig = EPALMConfig()):
        super().__init__()
        self.lm, self.encoder, self.config = lm, encoder, config
        for p in [*lm.parameters(), *encoder.parameters()]:
            p.requires_grad_(False)
        K, hidden = config.num_levels, lm.config.hidden_size
        self.start, self.end = injection_window(lm.config.num_hidden_layers, K,
                                                config.inject_start, config.inject_end)
        width = self.end - self.start
        self.level_at = {self.start + (k * width) // K: k for k in range(K)}  # LM layer -> encoder level
        heads = lm.config.num_attention_heads  # GQA: as many tokens as query heads share a key-value head
        M = heads // getattr(lm.config, "num_key_value_heads", heads) if config.media_tokens is None \
            else config.media_tokens
        if M < 1:
            raise ValueError(f"media_tokens {M}: expected at least 1")
        self.media_tokens = M
        n_conn = 1 if config.shared_connector else K
        self.connector = nn.ModuleList(nn.Linear(encoder.hidden_size, M * hidden) for _ in range(n_conn))
        # the prompt lives in token-embedding space (before OPT's project_in); start from real token embeddings,
        # from row 4 on: OPT's rows 0-3 are its special tokens <s> <pad> </s> <unk> (Llama 2's: 0-2)
        emb = lm.embed_tokens.weight
        rows = torch.randint(4, emb.shape[0], (config.prompt_length,), device="cpu").to(emb.device)
        # no prompt, no parameter: an empty one would make autograd record every layer below the window
        self.prompt = nn.Parameter(emb.detach()[rows].clone().float()) if config.prompt_length else None
        self.prompt_mlp = None
        if config.prompt_mlp and config.prompt_length:
            d = emb.shape[1]
            self.prompt_mlp = nn.Sequential(nn.Linear(d, config.prompt_mlp_hidden), nn.Tanh(),
                                            nn.Linear(config.prompt_mlp_hidden, d))
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval(), self.encoder.eval()  # frozen backbones never run dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_report(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters())
        total = parameter_count(self)  # a quantized weight counts as the parameters it stands for
        return f"trainable: {n:,} ({100 * n / total:.3f}% of {total:,})"

    # ---- the pieces ----
    @torch.no_grad()
    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's [CLS] token after each of its last K blocks: (B, K, D_enc). Cacheable."""
        levels = self.encoder(media, last=self.config.num_levels)
        return torch.stack([h[:, 0] for h in levels], dim=1)

    def inject_tokens(self, media=None, features=None) -> torch.Tensor | None:
        """(B, K, M, hidden) tokens to inject, from media or from precomputed encode() features."""
        if features is None and media is None:
            return None
        f = self.encode(media) if features is None else features
        if len(self.connector) == 1:
            out = self.connector[0](f.to(self.connector[0].weight.dtype))
        else:
            out = torch.stack([c(f[:, k].to(c.weight.dtype)) for k, c in enumerate(self.connector)], dim=1)
        return out.unflatten(-1, (self.media_tokens, -1))

    def prompt_vectors(self) -> torch.Tensor:
        return self.prompt if self.prompt_mlp is None else self.prompt_mlp(self.prompt)

    def embed(self, input_ids, attention_mask, media: bool = False):
        """Prompt + text into the LM's width: h (B, P+T, hidden); their positions (B, P+T), text from 0 over its
        real tokens and the prompt just before it (-P..-1); and the key mask of the slots [media, prompt, text]
        (B, M+P+T), its M media columns saying whether media tokens exist."""
        B, P = input_ids.shape[0], self.config.prompt_length
        tok = self.lm.embed_tokens(input_ids)
        if P:
            tok = torch.cat([self.prompt_vectors().to(tok.dtype).expand(B, -1, -1), tok], dim=1)
        prompt_positions = torch.arange(-P, 0, device=tok.device).expand(B, P)
        positions = torch.cat([prompt_positions, position_ids(attention_mask)], 1)
        valid = torch.cat([attention_mask.new_full((B, self.media_tokens), media), attention_mask.new_ones(B, P),
                           attention_mask], dim=1).bool()
        return self.lm.embed(tok, positions), positions, valid

    def run_layers(self, h, positions, valid, inj=None, cache=None, slots=None):
        """The only loop through the LM's layers, with injection (training forward, prefill, decode step).
        h: (B, T, hidden) at `positions` (B, T), in `slots` (T,) of [media x M, prompt, text, generated ...]
          (None: M..M+T-1, without a cache); valid: (B, S) key mask over the slots (S = M+T without a cache, the
          cache's length with one), its first M columns saying whether media tokens exist; inj: (B, K, M, hidden)
          tokens to inject (training, prefill; in decode steps the media tokens are in the cache); cache: one
          KVCache per layer, or None."""
        below, above = self.layer_inputs(positions, valid, slots, media=inj is not None, cached=cache is not None)
        for i, layer in enumerate(self.lm.layers):
            if inj is not None and i in self.level_at:  # first prepended, then overwritten
                tok = inj[:, self.level_at[i]].to(h.dtype)
                h = torch.cat([tok, h if i == self.start else h[:, tok.shape[1]:]], dim=1)
            mask, at, rotary = below if i < self.start else above
            h = layer(h, mask, None if cache is None else cache[i], at, rotary)
        return h

    def layer_inputs(self, positions, valid, slots, media: bool, cached: bool):
        """(mask, slots, rotary) for the layers below the window and for those from it on. The keys are the
        cache's slots, or h's own rows without a cache; slots 0..M-1, the media tokens, are queries where they
        enter h:

            cache  inj    below the window               from the window on
            no     no     keys M..                       keys M..
            no     yes    keys M..                       queries and keys 0.. (media slots added)
            yes    no     all slots, media masked        all slots, media as valid says (decode)
            yes    yes    all slots, media masked        all slots, media queries added (prefill)
        The media tokens' positions are -(P+M)..-(P+1) (see the file's docstring). One causal_mask, and without
        media one rotary, serve both halves: a decode step pays for them every token."""
        M = self.media_tokens
        slots = torch.arange(M, positions.shape[1] + M, device=valid.device) if slots is None else slots
        late_slots, late_positions = slots, positions  # a decode step: no media tokens enter
        if media:
            media_slots = torch.arange(M, device=valid.device)
            late_slots = torch.cat([media_slots, slots])
            late_positions = torch.cat([(media_slots - M - self.config.prompt_length).expand(len(positions), M),
                                        positions], 1)
        late = causal_mask(valid, late_slots)
        early = (late[:, :, M:] if media else late) & (torch.arange(valid.shape[1], device=valid.device) >= M)
        if not cached:  # the keys are h's own rows: the media slots only while the media tokens are in h
            early, late = early[..., M:], (late if media else late[..., M:])
        rotary = self.lm.rotary(positions)
        return (early, slots, rotary), (late, late_slots, self.lm.rotary(late_positions) if media else rotary)

    def forward(self, media=None, input_ids=None, attention_mask=None, targets=None, features=None):
        """Logits aligned with input_ids (prompt and media positions removed). targets: like input_ids, -100
        where not supervised; position t's logits are scored against targets[t + 1]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        T = input_ids.shape[1]
        inj = self.inject_tokens(media, features)
        h, positions, valid = self.embed(input_ids, attention_mask, media=inj is not None)
        h = self.run_layers(h, positions, valid, inj)
        logits = self.lm.logits(h[:, -T:])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                   ignore_index=-100)
        return logits, loss

    # New tokens per sample, input_ids LEFT padded: greedy, sampling or beam search (transformers', with
    # early_stopping=True), the encoder run once per sample; generate.py's function, called as a method.
    generate = generate_tokens


# ---- the frozen backbones, by name (a model rebuilt from an adaptation checkpoint: checkpoint.py) ----
ENCODERS = {"image": ViT, "audio": AST, "video": TimeSformer}
# config.json's model_type -> (the LM, its tokenizer loader)
LANGUAGE_MODELS = {"opt": (opt.OPT, opt.load_tokenizer), **{t: (llama.Llama, llama.load_tokenizer)
                                                           for t in llama.MODEL_TYPES}}


def load_backbones(modality: str, lm_name: str, encoder_name: str, dtype: torch.dtype | None = None, shard=None,
                   quantize: str | None = None, group_size: int = 128, quantize_encoder: bool = False):
    """The frozen LM (the family config.json's model_type names), its tokenizer and the modality's frozen
    encoder, straight into `dtype`. shard: applied to each backbone on the meta device before its weights are
    read (FSDP, see train.py). quantize: None, "int8" or "int4" (groups of group_size inputs): the LM's linear
    layers (and the encoder's, with quantize_encoder) quantized as their weights are read (quantize.py)."""
    if modality not in ENCODERS:
        raise ValueError(f"modality {modality!r}: expected one of {', '.join(ENCODERS)}")
    if quantize_encoder and quantize is None:
        raise ValueError("quantize_encoder: the encoder is quantized as the LM is, and quantize is None")
    quantization = Quantization(quantize, group_size) if quantize is not None else None
    folder = str(hub.resolve(lm_name, extra_files=("tokenizer.json", "vocab.json", "merges.txt",
                                                   "generation_config.json")))
    kind = hub.read_json(folder).get("model_type")
    if kind not in LANGUAGE_MODELS:
        raise ValueError(f"{lm_name}: model_type {kind!r} is not a supported LM ({', '.join(LANGUAGE_MODELS)})")
    lm_class, load_tokenizer = LANGUAGE_MODELS[kind]
    lm = lm_class.from_pretrained(folder, dtype=dtype, shard=shard, quantization=quantization)
    encoder = ENCODERS[modality].from_pretrained(encoder_name, dtype=dtype, shard=shard,
                                                 quantization=quantization if quantize_encoder else None)
    return lm, load_tokenizer(folder), encoder
