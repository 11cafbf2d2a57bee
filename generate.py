"""Generation for eP-ALM: a prefill, a one-token decode step, and greedy / sampling / beam search over them.

The KV cache is preallocated for the whole generation (opt.KVCache) and written in place at tensor slots, so the
decode step has static shapes and can be compiled (`compile=True`: torch.compile, with CUDA graphs on CUDA).
Beam search runs as tensor operations over (batch, beams), with no Python loop over samples or candidates and no
host round trip per step beyond the "all done?" check. Its results are exactly transformers' beam search with
early_stopping=True: top 2 x beams candidates over beams x vocab, the best `beams` that do not end go on, those
among the best `beams` that end (EOS, or the last step) join the finished ones, scored sum(log p) / length **
length_penalty, and a sample stops taking new ones when it has `beams` of them.

Slots of the sequence (one cache row per sample, or per beam): [media x M] [prompt x P] [text x T] [generated
...]; the M media slots are written only by the layers that see the media tokens. The model argument is duck-typed
(model.py's EPALM: inject_tokens, embed, run_layers, lm, config, media_tokens; the LM's interface is in model.py's
docstring); this file does not import model.py. EOS may be several ids (Llama 3): a row ends at any of them.

References: pytorch-labs/gpt-fast generate.py (prefill, decode_one_token, compile with mode="reduce-overhead");
transformers' GenerationMixin._beam_search (the semantics matched here, checked by tests/test_generate.py).
"""
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from opt import KVCache

TEXT_BUCKET = 16  # compiled steps: the text is left-padded to a multiple of this, so few shapes get compiled
NEG = -1.0e9  # transformers' "impossible" score: the same constant, so ties break the same way


def prefill(model, input_ids, attention_mask, inj, cache: list[KVCache], max_new_tokens: int):
    """The prompt and text (and media, if inj) into the cache. Returns the next-token logits (B, vocab) and the
    key mask over every slot of the cache (generated slots valid from the start: causality hides the future)."""
    h, positions, valid = model.embed(input_ids, attention_mask, media=inj is not None)
    valid = F.pad(valid, (0, max_new_tokens), value=True)
    slots = torch.arange(model.media_tokens, h.shape[1] + model.media_tokens, device=h.device)
    return model.lm.logits(model.run_layers(h, positions, valid, inj, cache, slots)[:, -1]), valid


def decode_one_token(model, cache: list[KVCache], tokens, positions, slot, valid):
    """One new token per row (tokens, positions: (N,)) stored at cache slot `slot` (1,); returns (N, vocab)
    logits. Static shapes: every argument keeps its shape from step to step."""
    lm, positions = model.lm, positions[:, None]
    h = lm.embed(lm.embed_tokens(tokens[:, None]), positions)
    return lm.logits(model.run_layers(h, positions, valid, None, cache, slot)[:, -1])


_compiled = {}
_kept_caches = weakref.WeakKeyDictionary()  # model -> its KV cache, kept between calls when compiled


def generation_cache(model, rows: int, slots: int, dtype, device, keep: bool) -> list[KVCache]:
    """A zeroed KV cache (the LM's new_cache); with keep (compiled steps), the same buffers again on each call of
    the same shape, so that CUDA graphs replay against the addresses they recorded (as gpt-fast's setup_caches),
    marked static."""
    old = _kept_caches.get(model) if keep else None
    k = None if old is None else old[0].k
    if k is not None and (k.shape[0], k.shape[2], k.dtype, k.device) == (rows, slots, dtype, device):
        return old  # what it holds from the last call is finite, and every slot is written before it is read
    cache = model.lm.new_cache(rows, slots, dtype, device)
    if keep:
        for layer in cache:
            torch._dynamo.mark_static_address(layer.k)
            torch._dynamo.mark_static_address(layer.v)
        _kept_caches[model] = cache
    return cache


def decode_step(compile: bool, device: torch.device):
    """The decode step, eager or compiled once per device type (torch.compile caches what it compiles, per
    model and shape; static shapes, and CUDA graphs on CUDA, where per-step launch overhead is what matters)."""
    if not compile:
        return decode_one_token
    if device.type not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[device.type] = torch.compile(decode_one_token, mode=mode, dynamic=False, fullgraph=True)
    return _compiled[device.type]


def stop_check(device: torch.device, all_done=None):
    """check(done: 0-d bool tensor) -> stop? With all_done (e.g. an all-reduce across ranks), stop only when it
    says so. On CUDA the flag read is the previous step's, copied without blocking, so the host never waits for
    the step it has just launched; at worst one extra step runs, which changes no result."""
    pending = []

    def check(done):
        if device.type != "cuda":
            local = bool(done)
        else:
            event = torch.cuda.Event()
            pending.append((done.to("cpu", non_blocking=True), event))
            event.record()
            local = False
            if len(pending) == 2:
                flag, event = pending.pop(0)
                event.synchronize()
                local = bool(flag)
        return all_done(local) if all_done is not None else local
    return check


# inference_mode, not no_grad: no tensor made here is ever seen by autograd, so no op pays for version counters
# and view tracking; a decode step is ~100 tiny ops, and that bookkeeping was ~9% of its CPU time (bench.py)
@torch.inference_mode()
def generate(model, media=None, input_ids=None, attention_mask=None, *, max_new_tokens=30, num_beams=1,
             temperature=0.0, top_k=None, top_p=None, eos_token_id=None, features=None, length_penalty=1.0,
             compile=False, all_done=None) -> list[list[int]]:
    """New tokens per sample (the final EOS not included); input_ids LEFT padded.
    temperature 0: greedy, or beam search when num_beams > 1 (which ignores temperature, top_k and top_p);
    > 0: sampling with optional top_k / top_p.
    eos_token_id None: the LM's; one id or a list. all_done: see stop_check. Rows already finished are fed EOS
    (greedy, sampling) or keep their beams (beam search) until every row is, so all of them run the same steps."""
    lm = model.lm
    eos = lm.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor(eos, device=input_ids.device).view(-1)  # one id or several
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if compile and input_ids.shape[1] % TEXT_BUCKET:  # a few static shapes, not one per text length (VQA)
        pad = TEXT_BUCKET - input_ids.shape[1] % TEXT_BUCKET
        input_ids = F.pad(input_ids, (pad, 0), value=lm.config.pad_token_id)
        attention_mask = F.pad(attention_mask, (pad, 0), value=0)  # more left padding: nothing attends to it
    B, T = input_ids.shape
    if T + max_new_tokens > lm.config.max_position_embeddings:  # a bound known without a device sync
        raise ValueError(f"{T} input + {max_new_tokens} new tokens exceed max_position_embeddings "
                         f"{lm.config.max_position_embeddings}")
    beams = num_beams if num_beams > 1 else 1
    inj = model.inject_tokens(media, features)  # the encoder runs once per sample, never per beam
    start = model.media_tokens + model.config.prompt_length + T  # the first generated token's slot
    device = input_ids.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else lm.embed_tokens.weight.dtype  # what the layers' key and value projections will output
    cache = generation_cache(model, B * beams, start + max_new_tokens, dtype, device, keep=compile)
    # row = sample * beams + beam: the prefill fills each sample's first beam, the other beams copy its slots
    logits, valid = prefill(model, input_ids, attention_mask, inj, [c.every(beams) for c in cache], max_new_tokens)
    for buf in (b for c in cache for b in (c.k, c.v)):
        rows = buf.view(B, beams, *buf.shape[1:])
        rows[:, 1:, :, :start] = rows[:, :1, :, :start]
    run = Decoder(model, cache, valid.repeat_interleave(beams, 0), attention_mask.sum(1).repeat_interleave(beams),
                  torch.tensor([start], device=device), decode_step(compile, device), stop_check(device, all_done))
    if beams > 1:
        return beam_search(logits, run, B, beams, max_new_tokens, eos, length_penalty, start)
    return greedy_or_sample(logits, run, B, max_new_tokens, eos, temperature, top_k, top_p)


@dataclass
class Decoder:
    """What each decode step needs: tokens go in at `slot` (1,) with text positions `positions` (N,)."""
    model: object
    cache: list[KVCache]
    valid: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor
    step: Callable
    check: Callable


def advance(run: Decoder, tokens):
    """Feed tokens (N,) at the current slot; returns their next-token logits (N, vocab)."""
    if run.valid.is_cuda:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: their memory is free
    try:
        logits = run.step(run.model, run.cache, tokens, run.positions, run.slot, run.valid)
    except Exception as e:  # a compiler problem must not cost an evaluation: the eager step computes the same
        if run.step is decode_one_token:
            raise
        warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "decoding eagerly from now on")
        _compiled[run.valid.device.type] = run.step = decode_one_token
        logits = run.step(run.model, run.cache, tokens, run.positions, run.slot, run.valid)  # rewrites the slot
    run.positions, run.slot = run.positions + 1, run.slot + 1
    return logits


def greedy_or_sample(logits, run, B, max_new_tokens, eos, temperature, top_k, top_p):
    """One token per row and step (pick_token); a finished row is fed EOS until every row is."""
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    steps = max_new_tokens
    for t in range(max_new_tokens):
        tok = pick_token(logits.float(), temperature, top_k, top_p)
        tok = torch.where(done, eos[0], tok)
        out[:, t] = tok
        done = done | torch.isin(tok, eos)
        if t == max_new_tokens - 1 or run.check(done.all()):
            steps = t + 1
            break
        logits = advance(run, tok)
    return [until_eos(row, eos.tolist()) for row in out[:, :steps].tolist()]


def beam_search(logits, run, B, nb, max_new_tokens, eos, length_penalty, start):
    """transformers' beam search (early_stopping=True) over (B, nb) tensors; see the file's docstring."""
    device, V, M = logits.device, logits.shape[-1], max_new_tokens
    logp = F.log_softmax(logits.float(), -1)[:, None].repeat(1, nb, 1)  # every beam starts from the same
    run_scores = torch.full((B, nb), NEG, device=device)
    run_scores[:, 0] = 0.0  # all beams are identical: only the first one expands
    run_seqs = torch.zeros(B, nb, M, dtype=torch.long, device=device)
    fin_scores, fin_seqs = torch.full((B, nb), NEG, device=device), run_seqs.clone()
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    fin = torch.zeros(B, nb, dtype=torch.bool, device=device)  # which finished slots hold a hypothesis
    among_best = torch.arange(2 * nb, device=device) < nb  # only the best nb candidates may finish
    first_row = torch.arange(B, device=device)[:, None] * nb
    for t in range(1, M + 1):
        top_scores, top_idx = top_k(logp.add_(run_scores[..., None]).view(B, nb * V), 2 * nb)  # in place:
        # a fresh (B, nb, V) tensor each step costs more than the add on a CPU (new pages to fault in)
        parent, tok = top_idx // V, top_idx % V
        eos_hit = torch.isin(tok, eos)
        ends = eos_hit if t < M else torch.ones_like(eos_hit)
        # the best nb candidates that do not end go on
        run_scores, keep = (top_scores + ends * NEG).topk(nb)
        kept, next_tok = parent.gather(1, keep), tok.gather(1, keep)
        # those among the best nb that end join the finished ones, unless the sample has nb (early_stopping=True).
        # Most steps none does: on a CPU, where reading the flag costs no device round trip, they skip this part
        just = ends & among_best
        if device.type != "cpu" or bool(just.any()):
            seqs = run_seqs.gather(1, parent[..., None].expand(-1, -1, M))
            seqs[:, :, t - 1] = tok
            score = top_scores / (t ** length_penalty) + fin.all(1, keepdim=True) * NEG
            score = score + ~just * NEG
            fin_scores, order = torch.cat([fin_scores, score], 1).topk(nb)
            fin_seqs = torch.cat([fin_seqs, seqs], 1).gather(1, order[..., None].expand(-1, -1, M))
            fin_len = torch.cat([fin_len, t - eos_hit.long()], 1).gather(1, order)
            fin = torch.cat([fin, just], 1).gather(1, order)
        run_seqs = run_seqs.gather(1, kept[..., None].expand(-1, -1, M))
        run_seqs[:, :, t - 1] = next_tok
        if t == M or run.check(fin.all()):
            break
        # beam j of sample b continues beam kept[b, j]: its generated slots move along (the rest are shared)
        rows = (first_row + kept).view(-1)
        for layer in run.cache:
            layer.reorder(rows, start, start + t - 1)
        # into the same buffer, as the add above, for the same reason
        torch.log_softmax(advance(run, next_tok.view(-1)).float(), -1, out=logp.view(B * nb, V))
    best, length = fin_seqs[:, 0].tolist(), fin_len[:, 0].tolist()
    return [seq[:n] for seq, n in zip(best, length)]


def pick_token(logits, temperature=0.0, top_k=None, top_p=None) -> torch.Tensor:
    """Greedy when temperature is 0, else a sample from the tempered, top-k / nucleus-filtered distribution."""
    if temperature == 0.0:
        return first_argmax(logits)
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


# Greedy and beam search pick the largest of each row of logits, tens of thousands long. A CPU finds a row's maximum
# in a vectorised pass but its index, or its top k, in a slow scalar one (5-10x slower per element): so the row is cut
# into blocks (views, no copy), the blocks' maxima found fast, and only the few blocks that can hold the answer, and
# the row's tail that fills no block, searched slowly.
BLOCK = 128


def blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) -> its whole blocks (N, L // BLOCK, BLOCK) and the tail (N, L % BLOCK), views of x."""
    whole = x.shape[-1] // BLOCK * BLOCK
    return x[:, :whole].unflatten(1, (-1, BLOCK)), x[:, whole:]


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of (N, L) finite values: the first maximum's index, from the first block holding the row's
    maximum (the tail comes last, so it wins only with a larger value)."""
    if x.shape[-1] < 4 * BLOCK:
        return x.max(-1).indices
    b, tail = blocks(x)
    top, best = b.amax(-1).max(-1)
    index = best * BLOCK + b[torch.arange(x.shape[0], device=x.device), best].max(-1).indices
    if tail.shape[-1]:
        tail_top, tail_index = tail.max(-1)
        index = torch.where(tail_top > top, b.shape[1] * BLOCK + tail_index, index)
    return index


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, -1) of (N, L): the k largest values lie in the tail or in the k blocks with the largest maxima (at
    most k blocks have a maximum at or above the k-th largest value), so only those are searched. The same values in
    the same order; among exactly equal values another index may come first (topk promises no order for ties)."""
    if x.shape[-1] < 4 * k * BLOCK:
        return x.topk(k)
    b, tail = blocks(x)
    chosen = b.amax(-1).topk(k).indices
    candidates = b.gather(1, chosen[..., None].expand(-1, -1, BLOCK)).flatten(1)
    values, at = torch.cat([candidates, tail], 1).topk(k)
    in_blocks = chosen.gather(1, (at // BLOCK).clamp(max=k - 1)) * BLOCK + at % BLOCK
    return values, torch.where(at < k * BLOCK, in_blocks, at - k * BLOCK + b.shape[1] * BLOCK)


def until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)
