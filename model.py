"""eP-ALM: a frozen language model given perception through late injection of encoder [CLS] tokens.

Shukor, Dancette, Cord, "eP-ALM: Efficient Perceptual Augmentation of Language Models", ICCV 2023.
Everything pretrained stays frozen. What trains is a linear connector (shared by the K encoder levels, or one
per level) and a soft prompt of P vectors. The encoder's last K blocks give K [CLS] tokens; the connector maps
them into the LM's width; they enter the LM's late layers [start, end): the first one is prepended as an extra
position 0 at layer `start`, each next one overwrites position 0 at a later layer (shallow levels go to early
layers), and the layers after the window carry that position along.

Sequence seen by the LM (left-padded text):   [media] [prompt x P] [pad ... pad] [text ...]
  - media: exists only from layer `start` on and attends only to itself (it is position 0, so plain
    causality gives exactly that: unlike the official code, it never sees future text or padding);
  - prompt: no positional embedding; text positions start at 0 as if there were no prompt;
  - padding is never attended; every query attends to itself so padded rows stay finite.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub
from ast_audio import AST
from opt import OPT, causal_mask, load_tokenizer
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
        n_conn = 1 if config.shared_connector else K
        self.connector = nn.ModuleList(nn.Linear(encoder.hidden_size, hidden) for _ in range(n_conn))
        # the prompt lives in token-embedding space (before project_in); start from real token embeddings
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
        total = sum(p.numel() for p in self.parameters())
        return f"trainable: {n:,} ({100 * n / total:.3f}% of {total:,})"

    # ---- the pieces ----
    @torch.no_grad()
    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's [CLS] token after each of its last K blocks: (B, K, D_enc). Cacheable."""
        levels = self.encoder(media, last=self.config.num_levels)
        return torch.stack([h[:, 0] for h in levels], dim=1)

    def inject_tokens(self, media=None, features=None) -> torch.Tensor | None:
        """(B, K, hidden) tokens to inject, from media or from precomputed encode() features."""
        if features is None and media is None:
            return None
        f = self.encode(media) if features is None else features
        if len(self.connector) == 1:
            return self.connector[0](f.to(self.connector[0].weight.dtype))
        return torch.stack([c(f[:, k].to(c.weight.dtype)) for k, c in enumerate(self.connector)], dim=1)

    def prompt_vectors(self) -> torch.Tensor:
        return self.prompt if self.prompt_mlp is None else self.prompt_mlp(self.prompt)

    def embed(self, input_ids, attention_mask):
        """Prompt + text into the LM's width. Returns h (B, P+T, hidden) and the key mask (B, P+T)."""
        B, P = input_ids.shape[0], self.config.prompt_length
        tok = self.lm.embed_tokens(input_ids)
        if P:
            tok = torch.cat([self.prompt_vectors().to(tok.dtype).expand(B, -1, -1), tok], dim=1)
        h = self.lm.project_in(tok)
        pos = self.lm.positions(self.lm.position_ids(attention_mask))
        h = h + F.pad(pos, (0, 0, P, 0))  # the prompt gets no position
        valid = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1).bool()
        return h, valid

    def run_layers(self, h, valid, inj=None, caches=None):
        """The LM's layers with injection. h: the new positions (all of them, or one per step with caches);
        valid: (B, S) key mask of every non-media position so far; inj: (B, K, hidden) or None."""
        B, T, _ = h.shape
        S = valid.shape[1]
        prefill = caches is None or caches[0].k is None
        mask = causal_mask(valid, T, cached=S - T)  # (B, 1, T, S); padded rows attend themselves: never NaN
        if inj is not None:
            # media key in front: every text query may see it; in the prefill it is also a query of its own
            mask_media = F.pad(mask, (1, 0), value=True)
            if prefill:
                row = torch.zeros(B, 1, 1, S + 1, dtype=torch.bool, device=h.device)
                row[..., 0] = True
                mask_media = torch.cat([row, mask_media], dim=2)
        for i, layer in enumerate(self.lm.layers):
            if inj is not None and i >= self.start:
                if prefill and i in self.level_at:
                    tok = inj[:, self.level_at[i]][:, None].to(h.dtype)
                    h = torch.cat([tok, h if i == self.start else h[:, 1:]], dim=1)
                h = layer(h, mask_media, caches[i] if caches else None)
            else:
                h = layer(h, mask, caches[i] if caches else None)
        return h

    def forward(self, media=None, input_ids=None, attention_mask=None, targets=None, features=None):
        """Logits aligned with input_ids (prompt and media positions removed). targets: like input_ids, -100
        where not supervised; position t's logits are scored against targets[t + 1]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        T = input_ids.shape[1]
        h, valid = self.embed(input_ids, attention_mask)
        h = self.run_layers(h, valid, self.inject_tokens(media, features))
        logits = self.lm.logits(h[:, -T:])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                   ignore_index=-100)
        return logits, loss

    # ---- generation: KV cache, left padding, greedy / sampling / beam search ----
    def _step(self, tokens, valid, text_len, inj, caches):
        """Feed one new token per row; returns next-token logits (N, vocab) and the grown key mask."""
        h = self.lm.project_in(self.lm.embed_tokens(tokens[:, None])) + self.lm.positions(text_len[:, None])
        valid = F.pad(valid, (0, 1), value=True)
        return self.lm.logits(self.run_layers(h, valid, inj, caches)[:, -1]), valid

    @torch.no_grad()
    def generate(self, media=None, input_ids=None, attention_mask=None, max_new_tokens=30, num_beams=1,
                 temperature=0.0, top_k=None, top_p=None, eos_token_id=2, features=None,
                 length_penalty=1.0) -> list[list[int]]:
        """New tokens per sample (the final EOS not included). input_ids must be LEFT padded.
        temperature 0: greedy (or beam search when num_beams > 1); > 0: sampling with optional top_k / top_p.
        Beam search scores a finished hypothesis by sum(log p) / len ** length_penalty and stops a sample once
        it has num_beams finished ones (transformers' early_stopping=True)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inj = self.inject_tokens(media, features)  # the encoder runs once per sample, never per beam
        h, valid = self.embed(input_ids, attention_mask)
        caches = self.lm.new_caches()
        logits = self.lm.logits(self.run_layers(h, valid, inj, caches)[:, -1])
        text_len = attention_mask.sum(1)
        if num_beams > 1:
            return self._beam_search(logits, valid, text_len, inj, caches, num_beams, max_new_tokens,
                                     eos_token_id, length_penalty)
        B = input_ids.shape[0]
        out = torch.empty(B, 0, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            tok = pick_token(logits.float(), temperature, top_k, top_p)
            tok = torch.where(done, eos_token_id, tok)
            out, done = torch.cat([out, tok[:, None]], 1), done | (tok == eos_token_id)
            if done.all():
                break
            logits, valid = self._step(tok, valid, text_len, inj, caches)
            text_len = text_len + 1
        return [until_eos(row, eos_token_id) for row in out.tolist()]

    def _beam_search(self, logits, valid, text_len, inj, caches, num_beams, max_new_tokens, eos,
                     length_penalty):
        B, V, nb = logits.shape[0], logits.shape[-1], num_beams
        expand = torch.arange(B, device=logits.device).repeat_interleave(nb)  # (B*nb,) row of each beam
        for c in caches:
            c.reorder(expand)
        valid, text_len = valid[expand], text_len[expand]
        inj = None if inj is None else inj[expand]
        logp = F.log_softmax(logits.float(), -1)[expand]
        scores = torch.full((B, nb), -1e9, device=logits.device)
        scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
        seqs = [[[] for _ in range(nb)] for _ in range(B)]
        finished = [[] for _ in range(B)]  # per sample: (score, tokens), best first, at most nb
        for t in range(1, max_new_tokens + 1):
            total = (logp.view(B, nb, V) + scores[..., None]).view(B, nb * V)
            top_scores, top_idx = total.topk(2 * nb, dim=1)
            next_rows, next_toks = [], []
            for b in range(B):
                keep, full = [], len(finished[b]) == nb
                for rank, (s, i) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
                    beam, tok = divmod(i, V)
                    if tok == eos or t == max_new_tokens:  # a finished hypothesis, if among the best nb
                        if rank < nb and not full:
                            hyp = seqs[b][beam] + ([] if tok == eos else [tok])
                            finished[b].append((s / t ** length_penalty, hyp))
                    elif len(keep) < nb:
                        keep.append((s, beam, tok))
                finished[b] = sorted(finished[b], key=lambda x: -x[0])[:nb]
                while len(keep) < nb:  # a sample with no live candidate left: pad with dead beams
                    keep.append((-1e9, 0, eos))
                seqs[b] = [seqs[b][beam] + [tok] for _, beam, tok in keep]
                scores[b] = torch.tensor([s for s, _, _ in keep])
                next_rows += [b * nb + beam for _, beam, _ in keep]
                next_toks += [tok for _, _, tok in keep]
            if all(len(f) == nb for f in finished) or t == max_new_tokens:
                break
            rows = torch.tensor(next_rows, device=logits.device)
            for c in caches:
                c.reorder(rows)
            logits, valid = self._step(torch.tensor(next_toks, device=logits.device), valid[rows],
                                       text_len[rows], None if inj is None else inj[rows], caches)
            text_len = text_len[rows] + 1
            logp = F.log_softmax(logits.float(), -1)
        return [f[0][1] for f in finished]


def pick_token(logits, temperature=0.0, top_k=None, top_p=None) -> torch.Tensor:
    """Greedy when temperature is 0, else a sample from the tempered, top-k / nucleus-filtered distribution."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


# ---- backbones, and a model rebuilt from an adaptation checkpoint (its file format: hub.py) ----
ENCODERS = {"image": ViT, "audio": AST, "video": TimeSformer}


def load_backbones(modality: str, lm_name: str, encoder_name: str, dtype: torch.dtype | None = None, shard=None):
    """The frozen LM, its tokenizer and the modality's frozen encoder, straight into `dtype`. shard: applied to
    each backbone on the meta device before its weights are read (FSDP, see train.py)."""
    if modality not in ENCODERS:
        raise ValueError(f"modality {modality!r}: expected one of {', '.join(ENCODERS)}")
    lm = OPT.from_pretrained(lm_name, dtype=dtype, shard=shard)
    encoder = ENCODERS[modality].from_pretrained(encoder_name, dtype=dtype, shard=shard)
    return lm, load_tokenizer(lm_name), encoder


def from_checkpoint(path, dtype: torch.dtype | None = None, shard=None):
    """(EPALM, tokenizer, run configuration) rebuilt from an adaptation checkpoint: its configuration names
    the backbones, which are loaded as in training."""
    state, config = hub.load_adapter(path)
    lm, tokenizer, encoder = load_backbones(config["modality"], config["lm"], config["encoder"], dtype, shard)
    model = EPALM(lm, encoder, EPALMConfig(**config["epalm"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(set(trainable) ^ set(state)) + [n for n in state if n in trainable and
                                                  state[n].shape != trainable[n].shape]
    if bad:
        raise ValueError(f"{path}: parameters do not match the model it names: {', '.join(bad)}")
    model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer, config
