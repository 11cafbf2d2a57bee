"""bench.py: how fast epalm trains and generates, side by side with transformers, as ratios from one process.

Random weights with the official shapes (no downloads): each backbone is built in transformers, and ours gets the
very same tensors through its own key renaming, so both run identical weights on identical inputs. Runs of the
things compared alternate and each figure is a median over repeats: these machines are noisy, so only the
ratios mean anything.

  python bench.py --quick            # CPU, < 3 minutes on 2 cores (CI runs it with --repeats 1, and the tiny mode)
  python bench.py                    # CPU, the full set (opt-125m and opt-350m, compile), < 15 minutes
  python bench.py --device cuda      # accelerator: OPT-2.7B + ViT-B and OPT-6.7B + ViT-L, bf16, compile, MFU
  python bench.py --generation       # only generation (with --device cuda: the accelerator's, batch 1/16/64)
  python bench.py --llama            # only the Llama rows (SmolLM2-135M's shape): forward, +backward, generation
  python bench.py --quantize         # int8 and int4 against full precision (with --device cuda: on the GPU)

Sections (JSON keys): matmul (this machine's own fp32 matmul FLOP/s), backbones (forward, LM forward+backward),
train_step (plain / cached encoder features / prompt off / compile, with MFU), generate (greedy and 3 beams vs
transformers' generate, at a real LM's shapes and on a small LM where per-step overhead shows; the Llama family at
SmolLM2-135M's shape in the full run, backbones too), memory (peak of one training step with frozen weights in bf16
vs fp32), accelerator (training step; generation with 3 beams, and the projected time to caption COCO's 5,000 test
images); with --quantize: quantize_bytes (bytes per parameter of the paper's LMs), quantize (int8 / int4 against fp32:
logit error, greedy agreement, training step and generation; the toy LMs' reading test), quantize_loading (peak
memory while loading), accelerator_quantize (the pt-L step, its memory and generation on a GPU).

References: karpathy/nanoGPT bench.py; PaLM (Chowdhery et al. 2022) appendix B for model FLOPs utilisation.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hub
import quantize
from ast_audio import AST
from llama import Llama, LlamaConfig
from model import EPALM, EPALMConfig
from opt import OPT, OPTConfig
from quantize import Quantization, parameter_count
from timesformer import TimeSformer
from vit import ViT, ViTConfig

# per mode: which LMs (OPT for every section, llama_lms for the backbone rows), batch sizes, repeats (gen_lms: LM,
# batch, new tokens, repeats for generation; the small LM at the generation issue's shape, batch 32 x 24 new
# tokens). quick and tiny keep every section but shrink what is slow on 2 cores; quick has no Llama row
# (SmolLM2-135M's 30 layers would add a minute).
MODES = {
    "tiny": dict(lms=["tiny"], llama_lms=["llama-tiny"], encoders=["tiny"], lm_batch=2, text=8, vit_batch=2,
                 ast_batch=1, video_batch=1, step_batch=2, prompt=2, levels=2, repeats=1,
                 gen_lms=[("tiny", 2, 4, 1), ("small", 2, 4, 1), ("llama-tiny", 2, 4, 1)],
                 gen_prompt=4, gen_new=4, compile=False, matmul_n=128, quant_lms=["tiny", "llama-tiny"],
                 quant_labels=("int8", "int4-g32"), quant_toy=False, quant_load=("opt", "tiny")),
    "quick": dict(lms=["opt-125m"], llama_lms=[], encoders=["base"], lm_batch=8, text=32, vit_batch=2, ast_batch=1,
                  video_batch=1, step_batch=4, prompt=10, levels=6, repeats=2, gen_prompt=8, gen_new=30,
                  gen_lms=[("opt-125m", 8, 30, 2), ("small", 32, 24, 15)], compile=False, matmul_n=1024,
                  quant_lms=["opt-125m"], quant_labels=("int8", "int4-g32", "int4-g128"), quant_toy=True,
                  quant_load=("opt", "opt-350m")),
    "full": dict(lms=["opt-125m", "opt-350m"], llama_lms=["smollm2-135m"], encoders=["base"], lm_batch=8, text=32,
                 vit_batch=8, ast_batch=2, video_batch=1, step_batch=8, prompt=10, levels=6, repeats=5,
                 gen_prompt=8, gen_new=30, gen_lms=[("opt-125m", 8, 30, 5), ("small", 32, 24, 25), ("smollm2-135m", 8, 30, 5)],
                 compile=True, matmul_n=2048, quant_lms=["opt-125m", "smollm2-135m"],
                 quant_labels=("int8", "int4-g32", "int4-g64", "int4-g128"), quant_toy=True,
                 quant_load=("opt", "opt-1.3b")),
}
TINY_OPT = dict(vocab_size=512, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32)
SMALL_OPT = dict(vocab_size=5000, hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=128)  # generation where per-step overhead shows
TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
LLAMA_SHAPES = {  # transformers.LlamaConfig fields; SmolLM2-135M's from its config.json (tied, GQA 9/3 heads)
    "llama-tiny": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def lm_kind(name: str) -> str:
    return "llama" if name in LLAMA_SHAPES else "opt"


# ---------------------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict, repeats: int, device: str = "cpu", warmup: int = 1) -> dict:
    """Median seconds of each callable; runs interleave (a, b, c, a, b, c, ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in names:
            times[name].append(timed(fns[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_rate(n: int, dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """This machine's dense matmul FLOP/s: the median of repeated n x n x n products."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    inner = max(1, int(2e9 // (2 * n ** 3))) if device == "cpu" else 20
    seconds = alternate({"mm": lambda: [a @ b for _ in range(inner)]}, repeats, device)["mm"]
    return 2 * n ** 3 * inner / seconds


# ---------------------------------------------------------------------------------------------- models

def hf_config(kind: str, name: str):
    """transformers' config of an official shape ('tiny' for the test's toy size)."""
    import transformers
    if kind == "llama":
        return transformers.LlamaConfig(**LLAMA_SHAPES[name], bos_token_id=1, eos_token_id=2)
    if kind == "opt":
        shape = {"tiny": TINY_OPT, "small": SMALL_OPT}.get(name) or {
            k: v for k, v in vars(OPTConfig.from_name(name)).items() if k != "remove_final_layer_norm"}
        return transformers.OPTConfig(**shape, dropout=0.0, attention_dropout=0.0)
    tiny = TINY_ENCODER if name == "tiny" else {}
    if kind == "vit":
        size = dict(image_size=32, patch_size=8) if name == "tiny" else {}
        if name == "large":
            tiny = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        return transformers.ViTConfig(**tiny, **size)
    if kind == "ast":
        size = dict(max_length=64, num_mel_bins=32) if name == "tiny" else dict(max_length=1024, num_mel_bins=128)
        return transformers.ASTConfig(**tiny, **size, frequency_stride=10, time_stride=10)
    size = dict(image_size=32, patch_size=8, num_frames=2) if name == "tiny" else dict(num_frames=8)
    return transformers.TimesformerConfig(**tiny, **size)


def build_pair(kind: str, name: str, device: str = "cpu"):
    """(ours, transformers') with identical weights: the reference is saved in the hub layout and ours is loaded
    from there by its own from_pretrained."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    cfg = hf_config(kind, name)
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "opt":
            ref = transformers.OPTForCausalLM(cfg)
        elif kind == "llama":
            ref = transformers.LlamaForCausalLM(cfg)
        elif kind == "vit":
            ref = transformers.ViTModel(cfg, add_pooling_layer=False)
        elif kind == "ast":
            ref = transformers.ASTModel(cfg)
        else:
            ref = transformers.TimesformerModel(cfg)
    ref.eval()
    # through the hub layout: transformers renames modules in memory and writes the official keys on save
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        ref.save_pretrained(folder)
        cls = {"opt": OPT, "llama": Llama, "vit": ViT, "ast": AST, "timesformer": TimeSformer}[kind]
        ours = cls.from_pretrained(folder)
    return ours.eval(), ref


def media_input(kind: str, encoder, batch: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    c = encoder.config
    if kind == "vit":
        shape = (batch, 3, c.image_size, c.image_size)
    elif kind == "ast":
        shape = (batch, c.max_length, c.num_mel_bins)
    else:
        shape = (batch, c.num_frames, 3, c.image_size, c.image_size)
    return torch.randn(shape, device=device, dtype=dtype)


def ref_forward(kind: str, ref, x):
    if kind in ("opt", "llama"):
        return ref(input_ids=x).logits
    if kind == "ast":
        return ref(input_values=x).last_hidden_state
    return ref(pixel_values=x).last_hidden_state


def ours_forward(kind: str, ours, x):
    return ours(x) if kind in ("opt", "llama") else ours(x, last=1)[0]


# ---------------------------------------------------------------------------------------------- FLOPs

def lm_step_flops(cfg: OPTConfig, batch: int, text: int, prompt: int, start: int, backward_from: int) -> float:
    """Matmul FLOPs of one eP-ALM LM pass: forward 2*N per token through every layer and the tied head (text
    positions only), plus the input-gradient backward (2*N per token again, attention's 4 products) through
    the layers the gradient crosses, [backward_from, L). Frozen weights get no weight gradients: none counted."""
    d, f, L = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers
    fwd = bwd = 0.0
    for i in range(L):
        S = prompt + text + (1 if i >= start else 0)  # the injected token joins at `start`
        layer = batch * (2 * S * (4 * d * d + 2 * d * f) + 4 * S * S * d)
        fwd += layer
        if i >= backward_from:
            bwd += batch * (2 * S * (4 * d * d + 2 * d * f) + 8 * S * S * d)
    head = 2 * batch * text * cfg.word_embed_proj_dim * cfg.vocab_size
    head += 2 * batch * text * d * cfg.word_embed_proj_dim if cfg.word_embed_proj_dim != d else 0
    return fwd + bwd + 2 * head


def encoder_flops(enc, batch: int) -> float:
    """Forward matmul FLOPs of the encoder on a batch (patch embedding, blocks)."""
    c = enc.config
    d, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    if isinstance(enc, AST):
        patches, patch_in = enc.grid[0] * enc.grid[1], c.patch_size ** 2
        return batch * (2 * patches * patch_in * d + L * (2 * (patches + 2) * (4 * d * d + 2 * d * f)
                                                         + 4 * (patches + 2) ** 2 * d))
    P = (c.image_size // c.patch_size) ** 2
    patch_in = 3 * c.patch_size ** 2
    if isinstance(enc, TimeSformer):
        T = c.num_frames
        per_block = (2 * P * T * (4 * d * d + d * d) + 4 * P * T * T * d  # temporal attention + temporal_fc
                     + 2 * T * (P + 1) * 4 * d * d + 4 * T * (P + 1) ** 2 * d  # spatial attention per frame
                     + 2 * (P * T + 1) * 2 * d * f)
        return batch * (2 * P * T * patch_in * d + L * per_block)
    return batch * (2 * P * patch_in * d + L * (2 * (P + 1) * (4 * d * d + 2 * d * f) + 4 * (P + 1) ** 2 * d))


# ---------------------------------------------------------------------------------------------- sections

def bench_backbones(mode: dict, device: str, notes: list) -> dict:
    """Forward (and LM forward+backward) of ours vs transformers' on identical weights and inputs, fp32 eager,
    then ours compiled."""
    out = {}
    R = mode["repeats"]
    jobs = [(lm_kind(name), name, mode["lm_batch"]) for name in mode["lms"] + mode["llama_lms"]]
    for enc in mode["encoders"]:
        jobs += [("vit", enc, mode["vit_batch"]), ("ast", enc, mode["ast_batch"]), ("timesformer", enc,
                                                                                    mode["video_batch"])]
    for kind, name, batch in jobs:
        ours, ref = build_pair(kind, name, device)
        is_lm = kind in ("opt", "llama")
        x = (torch.randint(4, ours.config.vocab_size, (batch, mode["text"]), device=device) if is_lm
             else media_input(kind, ours, batch, device))
        with torch.no_grad():
            diff = (ours_forward(kind, ours, x) - ref_forward(kind, ref, x)).abs().max().item()
            fns = {"ours": lambda: ours_forward(kind, ours, x), "transformers": lambda: ref_forward(kind, ref, x)}
            if mode["compile"]:
                compiled = torch.compile(ours)
                t0 = time.perf_counter()
                ours_forward(kind, compiled, x)
                compile_s = time.perf_counter() - t0
                fns["ours_compiled"] = lambda: ours_forward(kind, compiled, x)
            t = alternate(fns, R, device)
        row = {"batch": batch, "max_abs_diff": diff, "ours_s": t["ours"], "transformers_s": t["transformers"],
               "speedup": t["transformers"] / t["ours"]}
        if "ours_compiled" in t:
            row.update(ours_compiled_s=t["ours_compiled"], compile_speedup=t["transformers"] / t["ours_compiled"],
                       compile_time_s=compile_s)
        if is_lm:  # forward + backward with every weight trainable, the usual LM training pass
            def fwd_bwd(m, logits_of):
                m.zero_grad(set_to_none=True)
                logits = logits_of(x)
                F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
            t = alternate({"ours": lambda: fwd_bwd(ours, ours), "transformers": lambda: fwd_bwd(
                ref, lambda ids: ref(input_ids=ids).logits)}, R, device)
            row.update(train_ours_s=t["ours"], train_transformers_s=t["transformers"],
                       train_speedup=t["transformers"] / t["ours"])
        out[name if name.startswith("opt-") or kind == "llama" else f"{kind}-{name}"] = row
        del ours, ref
    if not mode["compile"]:
        notes.append("backbones: torch.compile skipped in this mode (its first call takes ~45 s per model on 2 "
                     "CPU cores); the full run has it")
    return out


def build_epalm(lm_name: str, enc_kind: str, enc_name: str, mode: dict, prompt: int, device: str = "cpu",
                dtype=torch.float32):
    lm, _ = build_pair("opt", lm_name, device)
    enc, _ = build_pair(enc_kind, enc_name, device)
    lm, enc = lm.to(dtype), enc.to(dtype)
    torch.manual_seed(0)
    model = EPALM(lm, enc, EPALMConfig(num_levels=mode["levels"], prompt_length=prompt)).to(device)
    return model


def step_fn(model, media, ids, mask, features=None, forward=None):
    """One training step: forward, loss, backward, AdamW on what trains."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    forward = model if forward is None else forward

    def step():
        _, loss = forward(media, ids, mask, ids, features=features)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def saved_for_backward(model, ids, mask, features) -> int:
    """Bytes of the activations autograd keeps for one step's backward pass (the frozen weights it also keeps
    pointers to are not counted: they are in memory anyway). Exact and the same on every device."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(None, ids, mask, ids, features=features)
    del loss
    return sum(kept.values())


def input_prefix(model, prompt: int) -> EPALM:
    """train.py --inject input on the same backbones: the last level's token as a prefix at layer 0, the prompt
    kept (its features: the last level only)."""
    return EPALM(model.lm, model.encoder, EPALMConfig(num_levels=1, inject_start=0, inject_end=1,
                                                      prompt_length=prompt))


def bench_train_step(mode: dict, device: str, notes: list) -> dict:
    """The eP-ALM training step in five settings, per modality; MFU against this machine's fp32 matmul rate,
    measured by a probe that takes its turn among the steps (so both see the same load); the activations kept for
    the backward pass of the late-injection step without prompt against the input prefix (the paper's efficiency
    argument: late injection lets the backward pass stop at the window)."""
    out = {}
    B, T, P, R = mode["step_batch"], mode["text"], mode["prompt"], mode["repeats"]
    lm_name, enc_name = mode["lms"][0], mode["encoders"][0]
    for modality, enc_kind in (("image", "vit"), ("audio", "ast")):
        model = build_epalm(lm_name, enc_kind, enc_name, mode, P, device)
        lm_cfg = model.lm.config
        ids = torch.randint(4, lm_cfg.vocab_size, (B, T), device=device)
        mask = torch.ones_like(ids)
        media = media_input(enc_kind, model.encoder, B, device)
        feats = model.encode(media)
        # prompt off: the first trainable input is the injected token at layer `start`, so autograd records
        # nothing below it (model.py creates no prompt parameter at all then)
        cut = EPALM(model.lm, model.encoder, EPALMConfig(num_levels=mode["levels"], prompt_length=0))
        prefix = input_prefix(model, P)
        fns = {"plain": step_fn(model, media, ids, mask),
               "cached": step_fn(model, None, ids, mask, feats),
               "cached_noprompt": step_fn(cut, None, ids, mask, feats),
               "cached_input_prefix": step_fn(prefix, None, ids, mask, feats[:, -1:])}
        compile_s = None
        if mode["compile"]:
            compiled = torch.compile(cut)
            fns["cached_noprompt_compiled"] = step_fn(cut, None, ids, mask, feats, forward=compiled)
            t0 = time.perf_counter()
            fns["cached_noprompt_compiled"]()
            compile_s = time.perf_counter() - t0
        n = mode["matmul_n"]
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        fns["matmul_probe"] = lambda: a @ b  # the machine's matmul rate, measured in between the steps
        t = alternate(fns, R, device)
        rate = 2 * n ** 3 / t.pop("matmul_probe")
        grads_on_frozen = sum(p.grad is not None for p in [*model.lm.parameters(), *model.encoder.parameters()])
        full_bwd = lm_step_flops(lm_cfg, B, T, P, model.start, 0)
        cut_bwd = lm_step_flops(lm_cfg, B, T, 0, model.start, model.start)
        enc = encoder_flops(model.encoder, B)
        flops = {"plain": full_bwd + enc, "cached": full_bwd, "cached_noprompt": cut_bwd,
                 "cached_noprompt_compiled": cut_bwd, "cached_input_prefix": lm_step_flops(lm_cfg, B, T, P, 0, 0)}
        row = {"matmul_gflops": rate / 1e9, "batch": B, "text_tokens": T, "prompt": P, "levels": mode["levels"], "inject": [model.start, model.end],
               "frozen_params_with_grad": grads_on_frozen}
        for name, s in t.items():
            row[name] = {"s": s, "samples_per_s": B / s, "tflop": flops[name] / 1e12,
                         "mfu": flops[name] / s / rate}
        row["cached_vs_plain"] = t["plain"] / t["cached"]
        row["noprompt_vs_cached"] = t["cached"] / t["cached_noprompt"]
        row["noprompt_vs_input_prefix"] = t["cached_input_prefix"] / t["cached_noprompt"]
        for name, m, f in (("cached", model, feats), ("cached_noprompt", cut, feats),
                           ("cached_input_prefix", prefix, feats[:, -1:])):
            row[name]["saved_mib"] = saved_for_backward(m, ids, mask, f) / 2 ** 20
        row["saved_input_prefix_vs_noprompt"] = (row["cached_input_prefix"]["saved_mib"]
                                                 / row["cached_noprompt"]["saved_mib"])
        if compile_s is not None:
            row["compile_time_s"] = compile_s
            row["compiled_vs_eager"] = t["cached_noprompt"] / t["cached_noprompt_compiled"]
        out[modality] = row
        del model, cut, prefix
    if not mode["compile"]:
        notes.append("train_step: the compiled setting is skipped in this mode (compile time); the full run has it")
    return out


def lm_only(lm) -> EPALM:
    """EPALM with no media and no soft prompt: plain OPT or Llama, to generate against transformers' generate (one
    media slot, never filled, whatever the LM's heads)."""
    stub = torch.nn.Linear(1, 1)  # a stand-in encoder for the connector's width: no media in these runs
    stub.hidden_size = 1
    return EPALM(lm, stub, EPALMConfig(num_levels=1, prompt_length=0, media_tokens=1)).eval()


def compare_generation(model, ref, ids, mask, new: int, beams: int, repeats: int, device: str = "cpu",
                       compile: bool = False, extra: dict | None = None) -> dict:
    """Ours (eager, and compiled if asked) against transformers' generate, alternating; both run exactly `new`
    steps (no EOS) and the tokens are compared."""
    got = {}
    ref.generation_config.eos_token_id = None  # no EOS on either side: both run exactly `new` steps
    ref.generation_config.pad_token_id = 1

    def ours(compiled):
        def run():
            got["ours_compiled" if compiled else "ours"] = model.generate(
                None, ids, mask, max_new_tokens=new, num_beams=beams, eos_token_id=-1, compile=compiled)
        return run

    def theirs():
        with torch.no_grad():
            beam_flags = dict(early_stopping=True, length_penalty=1.0) if beams > 1 else {}
            seq = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_beams=beams,
                               do_sample=False, **beam_flags)
        got["transformers"] = seq[:, ids.shape[1]:].tolist()
    fns = {"ours": ours(False), "transformers": theirs, **(extra or {})}
    row = {"batch": ids.shape[0], "beams": beams, "new_tokens": new}
    if compile:
        fns["ours_compiled"] = ours(True)
        row["compile_time_s"] = timed(fns["ours_compiled"], device)  # the first call compiles
    t = alternate(fns, repeats, device)
    for name, s in t.items():
        row[f"{name}_s"] = s
        if name in ("ours", "ours_compiled", "transformers", "epalm"):  # the runs that generate
            row[f"{name}_tokens_per_s"] = ids.shape[0] * new / s
    row["speedup"] = t["transformers"] / t["ours"]
    row["same_tokens"] = got["ours"] == got["transformers"]
    if compile:
        row["compiled_speedup"] = t["transformers"] / t["ours_compiled"]
        row["compiled_same_tokens"] = got["ours_compiled"] == got["transformers"]
    return row


def bench_generate(mode: dict, device: str, notes: list) -> dict:
    """Greedy and 3-beam generation, ours vs transformers' generate on the same OPT or Llama weights (no media, no
    soft prompt, no EOS so both do exactly the asked number of steps), at (a) a real LM's shapes and (b) a small LM
    (2 layers, width 128, vocab 5,000, batch 32 x 24 new tokens), where the step is small and per-step overhead
    shows. Each row names its LM family; a note gives the ratios of each family."""
    out = {}
    for name, batch, new, repeats in mode["gen_lms"]:  # small steps are noisy: more repeats
        lm, ref = build_pair(lm_kind(name), name, device)
        model = lm_only(lm)
        torch.manual_seed(1)
        ids = torch.randint(4, lm.config.vocab_size, (batch, mode["gen_prompt"]), device=device)
        mask = torch.ones_like(ids)
        for label, beams in (("greedy", 1), ("beam3", 3)):
            row = compare_generation(model, ref, ids, mask, new, beams, repeats, device, compile=mode["compile"])
            out[f"{name} {label}"] = dict(row, family="Llama" if lm_kind(name) == "llama" else "OPT")
        del lm, ref, model
    notes.append("generate: ours eager (and compiled, full mode) vs transformers' generate, same weights, no EOS; "
                 "the small LM's step is a few small matmuls, so per-step overhead weighs most there")
    for family in ("OPT", "Llama"):
        ratios = [f"{name} {row['speedup']:.2f}" for name, row in out.items() if row["family"] == family]
        if ratios:
            notes.append(f"generate, {family} family, transformers' time / ours: {', '.join(ratios)}")
    return out


# ---------------------------------------------------------------------------------------------- memory

def peak_during(fn, measure, interval: float):
    """(fn(), the largest measure() that a thread sampled every interval seconds while fn ran)."""
    peak, running = [measure()], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], measure())
            time.sleep(interval)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return fn(), max(peak[0], measure())
    finally:
        running[0] = False
        sampler.join()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(mode_name: str, dtype_name: str) -> dict:
    """Run in a fresh process: build the image eP-ALM with frozen weights in dtype (on the meta device, so no
    fp32 copy is ever made), then one training step while a thread samples the resident set size."""
    import transformers  # noqa: F401  (the same imports as the parent, so the baseline is comparable)
    mode = MODES[mode_name]
    dtype = getattr(torch, dtype_name)
    lm_cfg = OPTConfig.from_dict(hf_config("opt", mode["lms"][0]).to_dict())
    vit_cfg = ViTConfig.from_dict(hf_config("vit", mode["encoders"][0]).to_dict())
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        lm, enc = OPT(lm_cfg), ViT(vit_cfg)
    torch.set_default_dtype(torch.float32)
    for m in (lm, enc):
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
    torch.manual_seed(0)
    model = EPALM(lm.eval(), enc.eval(), EPALMConfig(num_levels=mode["levels"], prompt_length=mode["prompt"]))
    B, T = mode["step_batch"], mode["text"]
    ids = torch.randint(4, lm_cfg.vocab_size, (B, T))
    media = torch.randn(B, 3, vit_cfg.image_size, vit_cfg.image_size, dtype=dtype)
    bytes_by_dtype = {}
    for p in model.parameters():
        key = f"{str(p.dtype).removeprefix('torch.')}_{'trainable' if p.requires_grad else 'frozen'}"
        bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + p.numel() * p.element_size()
    step = step_fn(model, media, ids, torch.ones_like(ids))
    step()  # warm-up: the optimizer state and allocator pools exist from here on
    base = rss_bytes()
    _, peak = peak_during(lambda: model(media, ids, torch.ones_like(ids), ids)[1].backward(), rss_bytes, 0.002)
    frozen = [p for p in [*model.lm.parameters(), *model.encoder.parameters()]]
    return {"param_bytes": bytes_by_dtype, "rss_before_step": base, "rss_peak_step": peak,
            "step_extra_bytes": peak - base,
            "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
            "trainable_grad_bytes": sum(p.grad.numel() * p.grad.element_size()
                                        for p in model.trainable_parameters() if p.grad is not None)}


def bench_memory(mode_name: str, notes: list) -> dict:
    out = {}
    for dtype in ("float32", "bfloat16"):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", mode_name, dtype],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"bench.py --memory-child {dtype} failed: {res.stderr.strip().splitlines()[-1:]}")
        out[dtype] = json.loads(res.stdout.strip().splitlines()[-1])
    out["frozen_bytes_ratio_bf16_vs_fp32"] = (out["bfloat16"]["param_bytes"].get("bfloat16_frozen", 0)
                                              / out["float32"]["param_bytes"]["float32_frozen"])
    out["peak_ratio_bf16_vs_fp32"] = out["bfloat16"]["rss_peak_step"] / out["float32"]["rss_peak_step"]
    notes.append("memory: resident set size of a fresh process sampled every 2 ms during one training step "
                 "(image, plain); CPU has no allocator peak counter, so short spikes can be missed")
    return out


# ---------------------------------------------------------------------------------------------- accelerator

ACCELERATOR_PAIRS = (("opt-2.7b", "base"), ("opt-6.7b", "large"))


def bench_accelerator(repeats: int, notes: list, device: str = "cuda", pairs=ACCELERATOR_PAIRS,
                      batches=(8, 64), dtype=torch.bfloat16) -> dict:
    """On a GPU: bf16 weights, the training step of OPT-2.7B + ViT-B and OPT-6.7B + ViT-L at the issue's batch (8)
    and a larger one (64), eager, and compiled at the larger batch; MFU against the measured bf16 matmul rate."""
    peak = matmul_rate(8192 if device == "cuda" else 256, dtype, device)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else device,
           "matmul_tflops": peak / 1e12}
    T, P = 32, 10
    for lm_name, vit_name in pairs:
        lm_cfg = OPTConfig.from_dict(hf_config("opt", lm_name).to_dict())
        vit_cfg = ViTConfig.from_dict(hf_config("vit", vit_name).to_dict())
        torch.manual_seed(0)
        with torch.device(device):
            lm, enc = OPT(lm_cfg).to(dtype).eval(), ViT(vit_cfg).to(dtype).eval()
            model = EPALM(lm, enc, EPALMConfig(num_levels=min(6, vit_cfg.num_hidden_layers - 1), prompt_length=P))
        key = f"{lm_name}+vit-{vit_name}"
        out[key] = {}
        for B in batches:
            ids = torch.randint(4, lm_cfg.vocab_size, (B, T), device=device)
            mask = torch.ones_like(ids)
            media = torch.randn(B, 3, vit_cfg.image_size, vit_cfg.image_size, device=device, dtype=dtype)
            feats = model.encode(media)
            fns = {"plain": step_fn(model, media, ids, mask), "cached": step_fn(model, None, ids, mask, feats)}
            row = {}
            if B == batches[-1]:  # compile once per model, at the batch that can fill the chip
                compiled = torch.compile(model, dynamic=False)
                fns["cached_compiled"] = step_fn(model, None, ids, mask, feats, forward=compiled)
                row["compile_time_s"] = timed(fns["cached_compiled"], device)
            t = alternate(fns, repeats, device, warmup=2)
            lm_f = lm_step_flops(lm_cfg, B, T, P, model.start, 0)
            flops = {"plain": lm_f + encoder_flops(enc, B), "cached": lm_f, "cached_compiled": lm_f}
            for name, s in t.items():
                row[name] = {"s": s, "samples_per_s": B / s, "tokens_per_s": B * T / s,
                             "tflops": flops[name] / s / 1e12, "mfu": flops[name] / s / peak,
                             "mfu_vs_989": flops[name] / s / 989e12}
            out[key][f"batch{B}"] = row
            print(key, f"batch{B}", json.dumps(row), file=sys.stderr, flush=True)  # partial results, if cut off
        if device == "cuda":
            out[key]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        del model, lm, enc, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    notes.append("accelerator: MFU against the bf16 matmul rate measured in this run (8192^3); mfu_vs_989 "
                 "against the H100/H200 datasheet's dense bf16 figure; compile at the larger batch only")
    return out


def lm_pair_shared(name: str, device: str, dtype: torch.dtype):
    """transformers' OPT with random weights at an official shape, and ours on the very same tensors (renamed in
    memory, no copy: a 6.7B model twice would not be needed, and writing it to disk would take minutes)."""
    import transformers
    cfg = hf_config("opt", name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = transformers.OPTForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        lm = OPT(OPTConfig.from_dict(cfg.to_dict()))
    state = {k.removeprefix("model.").removeprefix("decoder.").replace("self_attn.", ""): v
             for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    hub.load_weights(lm, state, dtype)
    return lm.eval(), ref


def bench_accelerator_generate(repeats: int, notes: list, device: str = "cuda", pairs=ACCELERATOR_PAIRS,
                               batches=(1, 16, 64), dtype=torch.bfloat16, beams: int = 3, new: int = 30,
                               text: int = 8, prompt: int = 10, compile: bool = True, images: int = 5000) -> dict:
    """Evaluation-style generation on a GPU (3 beams, 30 new tokens, bf16): ours (decode step compiled, CUDA
    graphs) against transformers' generate on the same LM weights (no media, no prompt, no EOS: tokens compared),
    then the whole eP-ALM generation (encoder, 10 prompt vectors, injection) and the projected time to caption
    COCO's 5,000 test images, against transformers' generate plus its ViT forward (it has no injection: a lower
    bound for an eP-ALM built on it). Worst case: every caption runs all 30 steps."""
    out = {}
    for lm_name, vit_name in pairs:
        lm, ref = lm_pair_shared(lm_name, device, dtype)
        enc, ref_enc = build_pair("vit", vit_name, device)
        enc, ref_enc = enc.to(dtype), ref_enc.to(dtype)
        levels = min(6, enc.config.num_hidden_layers - 1, lm.config.num_hidden_layers - 1)
        plain = lm_only(lm)
        torch.manual_seed(0)
        full = EPALM(lm, enc, EPALMConfig(num_levels=levels, prompt_length=prompt)).to(device).eval()
        key = f"{lm_name}+vit-{vit_name}"
        out[key] = {}
        for B in batches:
            ids = torch.randint(4, lm.config.vocab_size, (B, text), device=device)
            mask = torch.ones_like(ids)
            pixels = torch.randn(B, 3, enc.config.image_size, enc.config.image_size, device=device, dtype=dtype)

            def epalm():
                full.generate(pixels, ids, mask, max_new_tokens=new, num_beams=beams, eos_token_id=-1,
                              compile=compile)

            def vit():
                with torch.no_grad():
                    ref_enc(pixel_values=pixels)
            full_compile_s = timed(epalm, device)
            row = compare_generation(plain, ref, ids, mask, new, beams, repeats, device, compile=compile,
                                     extra={"epalm": epalm, "transformers_vit": vit})
            row["epalm_compile_time_s"] = full_compile_s
            runs = -(-images // B)
            ours_s = row["epalm_s"]
            theirs_s = row["transformers_s"] + row["transformers_vit_s"]
            row.update(coco_ours_s=runs * ours_s, coco_transformers_s=runs * theirs_s,
                       coco_speedup=theirs_s / ours_s)
            out[key][f"batch{B}"] = row
            print(key, f"batch{B}", json.dumps(row), file=sys.stderr, flush=True)  # partial results, if cut off
        del plain, full, lm, ref, enc, ref_enc
        torch._dynamo.reset()  # drop this pair's compiled steps (and their CUDA graphs)
        if device == "cuda":
            torch.cuda.empty_cache()
    notes.append(f"accelerator generation: {beams} beams, {new} new tokens, no EOS, {dtype}; ours compiled="
                 f"{compile}; COCO projection = ceil({images} / batch) x one batch's time, encoder included")
    return out


# ---------------------------------------------------------------------------------------------- quantization

# the paper's LMs at their official shapes (config.json); Llama-3.2-1B and Qwen2.5-1.5B tie their head
PAPER_LMS = {
    "opt-2.7b": (OPT, OPTConfig.from_name("opt-2.7b")),
    "opt-6.7b": (OPT, OPTConfig.from_name("opt-6.7b")),
    "llama-3.2-1b": (Llama, LlamaConfig.from_dict(dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0, eos_token_id=128001))),
    "qwen2.5-1.5b": (Llama, LlamaConfig.from_dict(dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, eos_token_id=151643))),
}
QUANTIZATIONS = {"int8": Quantization("int8"), "int4-g32": Quantization("int4", 32),
                 "int4-g64": Quantization("int4", 64), "int4-g128": Quantization("int4", 128)}


def meta_lm(cls, config, quantization: Quantization | None, dtype=torch.bfloat16):
    """The LM as loading builds it (hub.build: meta device, linear layers quantized), in dtype, without weights."""
    with torch.device("meta"):
        lm = cls(config)
    if quantization is not None:
        quantize.quantize_linears(lm, {}, quantization, dtype)
    return lm.to(dtype)


def bench_quantize_bytes(lms=tuple(PAPER_LMS)) -> dict:
    """Bytes per parameter of the paper's LMs in bf16 and quantized, on the meta device: every parameter and buffer
    (scales and zeros included; embeddings, norms and biases in bf16) over the full-precision parameter count."""
    out = {}
    for name in lms:
        cls, config = PAPER_LMS[name]
        lm = meta_lm(cls, config, None)
        params, embedding = parameter_count(lm), lm.embed_tokens.weight.numel()
        row = {"params": params, "embedding_share": embedding / params}
        for label, q in {"bf16": None, **QUANTIZATIONS}.items():
            size = quantize.model_bytes(meta_lm(cls, config, q))
            row[label] = {"bytes_per_param": size / params, "gb": size / 1e9}
        out[name] = row
    return out


def save_lm(kind: str, name: str, folder: Path, dtype=torch.float32) -> None:
    """transformers' LM with random weights at a shape of hf_config, in the hub layout (safetensors)."""
    import transformers
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.OPTForCausalLM
    cls(hf_config(kind, name)).to(dtype).save_pretrained(folder)


def load_child(folder: str, mode: str) -> dict:
    """Run in a fresh process: load the LM in folder as train.py does on a CPU (float32; mode "none", or quantized
    while loading) while a thread samples the anonymous resident memory (the file's pages are memory-mapped and
    can be dropped, so RssAnon is what the process needs); then its bytes."""
    def anon() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024
    cls = OPT if hub.read_json(folder)["model_type"] == "opt" else Llama
    base = anon()
    lm, peak = peak_during(lambda: cls.from_pretrained(
        folder, quantization=None if mode == "none" else QUANTIZATIONS[mode]), anon, 0.001)
    largest = max(m.in_features * m.out_features for m in lm.modules() if hasattr(m, "in_features"))
    return {"model_bytes": quantize.model_bytes(lm), "peak_extra_bytes": peak - base,
            "largest_weight_fp32_bytes": 4 * largest, "layer_fp32_bytes": 4 * parameter_count(lm.layers[0])}


def bench_quantize_loading(kind: str, name: str, notes: list, modes=("none", "int8", "int4-g128")) -> dict:
    """Peak memory while loading a float16 checkpoint (the official OPT files' dtype) in full precision and quantized,
    each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        save_lm(kind, name, Path(tmp), torch.float16)
        for mode in modes:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-child", tmp, mode],
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                raise RuntimeError(f"bench.py --load-child {mode} failed: {res.stderr.strip().splitlines()[-1:]}")
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    notes.append(f"quantize loading: {name} written in float16 by transformers, loaded in a fresh process per row "
                 "(float32 on a CPU); peak = the anonymous resident memory sampled every 1 ms over the start")
    return out


def bench_quantize(mode: dict, notes: list, device: str = "cpu") -> dict:
    """Quantized LMs against the full-precision one they were loaded from (random weights at a real shape, each
    run alternating with the others): logit error and top-1 agreement on a batch, greedy agreement over gen_new
    tokens, the eP-ALM training step (cached features, prompt on: the gradient crosses every layer) and greedy
    generation, all in the same run; the toy LMs' reading test (trained weights)."""
    import toy_pretrain
    from opt import load_tokenizer
    from llama import load_tokenizer as load_llama_tokenizer
    out = {}
    B, T, P, R, new = mode["step_batch"], mode["text"], mode["prompt"], mode["repeats"], mode["gen_new"]
    for name in mode["quant_lms"]:
        kind = lm_kind(name)
        with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
            save_lm(kind, name, Path(tmp))
            cls = Llama if kind == "llama" else OPT
            lms = {"fp32": cls.from_pretrained(tmp)}
            for label in mode["quant_labels"]:
                try:
                    lms[label] = cls.from_pretrained(tmp, quantization=QUANTIZATIONS[label])
                except ValueError as e:  # a width its groups do not divide (SmolLM2's 576 and groups of 128)
                    notes.append(f"quantize: {name} {label} skipped: {str(e).split(': ', 1)[1]}")
        vocab = lms["fp32"].config.vocab_size
        torch.manual_seed(1)
        ids = torch.randint(4, vocab, (B, T))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = {k: lm(ids) for k, lm in lms.items()}
        tokens = {k: lm_only(lm).generate(None, ids, mask, max_new_tokens=new, eos_token_id=-1)
                  for k, lm in lms.items()}
        ref, ref_tokens = logits["fp32"], torch.tensor(tokens["fp32"])
        row = {}
        for k in lms:
            got = torch.tensor(tokens[k])
            row[k] = {"logit_rel_error": ((logits[k] - ref).norm() / ref.norm()).item(),
                      "top1_agreement": (logits[k].argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "greedy_token_agreement": (got == ref_tokens).float().mean().item(),
                      "greedy_same_rows": int((got == ref_tokens).all(1).sum()),
                      "bytes_per_param": quantize.model_bytes(lms[k]) / parameter_count(lms[k])}
        # speed: the training step and greedy generation, every LM in the same alternation
        encoder = torch.nn.Linear(1, 1)
        encoder.hidden_size = 64
        feats = torch.randn(B, mode["levels"], 64)
        steps, gens = {}, {}
        for k, lm in lms.items():
            torch.manual_seed(0)
            model = EPALM(lm, encoder, EPALMConfig(num_levels=mode["levels"], prompt_length=P))
            steps[k] = step_fn(model, None, ids, mask, feats)
            gens[k] = (lambda m: lambda: m.generate(None, ids, mask, max_new_tokens=new, eos_token_id=-1))(
                lm_only(lm))
        t_step, t_gen = alternate(steps, R, device), alternate(gens, R, device)
        for k in lms:
            row[k].update(step_s=t_step[k], step_vs_fp32=t_step[k] / t_step["fp32"], greedy_s=t_gen[k],
                          greedy_vs_fp32=t_gen[k] / t_gen["fp32"])
        out[name] = row
        del lms, steps, gens
    toy = {}
    for lm_dir, load_tok in (("lm", load_tokenizer), ("llama", load_llama_tokenizer)) if mode["quant_toy"] else ():
        folder = str(Path(__file__).parent / "toy" / lm_dir)
        tokenizer = load_tok(folder)
        cls = Llama if lm_dir == "llama" else OPT
        for label, q in {"fp32": None, "int8": QUANTIZATIONS["int8"], "int4-g32": QUANTIZATIONS["int4-g32"],
                         "int4-g128": QUANTIZATIONS["int4-g128"]}.items():
            scores = toy_pretrain.reading_test(cls.from_pretrained(folder, quantization=q), tokenizer)
            toy.setdefault(f"toy {lm_dir}", {})[label] = {
                "reading_attribute_accuracy": statistics.mean(v["attribute accuracy"] for v in scores.values()),
                **{f"reading_{m}": v["attribute accuracy"] for m, v in scores.items()}}
    if toy:
        out["toy_reading"] = toy
    notes.append(f"quantize: random weights (transformers' init) at real shapes, so logits are flat and top-1 "
                 f"agreement understates what trained LMs keep; batch {B} x {T} tokens, {new} greedy tokens; step = "
                 f"cached features, {P} prompt vectors; ratios are the quantized time over fp32's (CPU dequantizes "
                 f"every matmul); toy rows: the reading test of toy_pretrain on the shipped trained toy LMs")
    return out


def random_backbone(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """A model built on the meta device given random weights on device (no checkpoint: writing OPT-6.7B would take
    minutes of a GPU lease): floats N(0, 0.02), quantized weights uniform over their codes, scales of a similar
    size. For speed and memory only."""
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.normal_(0, 0.02)
            else:
                t.random_(-127, 128) if t.dtype == torch.int8 else t.random_(0, 256)
        for m in model.modules():
            if isinstance(m, quantize.QuantizedLinear):
                m.scales.fill_(0.02 / 40) if m.mode == "int8" else m.scales.copy_(
                    torch.stack([torch.full_like(m.scales[..., 0], 0.02 / 4), torch.zeros_like(m.scales[..., 1])], -1))
    return model.eval()


def bench_quantize_accelerator(repeats: int, notes: list, device: str = "cuda", lms=("opt-2.7b", "opt-6.7b"),
                               vit_name: str = "large", batches=(8, 64), dtype=torch.bfloat16, new: int = 30,
                               gen_batch: int = 16, labels=("int8", "int4-g128")) -> dict:
    """On a GPU: the pt-L recipe's training step (the encoder run every step) with the LM in bf16, int8 and int4
    (groups of 128): samples/s and peak memory, then greedy generation's tokens/s, at batch 8 and a larger one;
    random weights made on the device."""
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else device}
    T, P = 32, 10
    vit_cfg = ViTConfig.from_dict(hf_config("vit", vit_name).to_dict())
    with torch.device("meta"):
        enc = ViT(vit_cfg)
    enc = random_backbone(enc.to(dtype), device)
    for lm_name in lms:
        config = OPTConfig.from_dict(hf_config("opt", lm_name).to_dict())
        for label, q in {"bf16": None, **{lb: QUANTIZATIONS[lb] for lb in labels}}.items():
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            lm = random_backbone(meta_lm(OPT, config, q, dtype), device)
            torch.manual_seed(0)
            model = EPALM(lm, enc, EPALMConfig(num_levels=min(6, vit_cfg.num_hidden_layers - 1),
                                               prompt_length=P)).to(device)
            row = {"weights_gb": quantize.model_bytes(lm) / 1e9}
            for B in batches:
                ids = torch.randint(4, config.vocab_size, (B, T), device=device)
                media = torch.randn(B, 3, vit_cfg.image_size, vit_cfg.image_size, device=device, dtype=dtype)
                s = alternate({"step": step_fn(model, media, ids, torch.ones_like(ids))}, repeats, device)["step"]
                row[f"batch{B}"] = {"samples_per_s": B / s, "s": s}
                if device == "cuda":
                    row[f"batch{B}"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            ids = torch.randint(4, config.vocab_size, (gen_batch, 8), device=device)
            plain = lm_only(lm)
            s = alternate({"gen": lambda: plain.generate(None, ids, torch.ones_like(ids), max_new_tokens=new,
                                                         eos_token_id=-1)}, repeats, device)["gen"]
            row["greedy_tokens_per_s"] = gen_batch * new / s
            out[f"{lm_name} {label}"] = row
            print(lm_name, label, json.dumps(row), file=sys.stderr, flush=True)  # partial results, if cut off
            del model, lm, plain
    notes.append(f"accelerator quantize: OPT + ViT-{vit_name} (random weights made on the device), {dtype}, eager; "
                 f"training step with the encoder, {P} prompt vectors, {T} tokens; greedy {new} tokens x {gen_batch}")
    return out


# ---------------------------------------------------------------------------------------------- report

def bench_distributed(notes: list, repeats: int = 3, iters: int = 30, lms=("toy LM", "opt-125m")) -> dict:
    """train.py under torchrun, two CPU processes (gloo): DDP against --fsdp on the same run (frozen weights held
    by each process, training samples/s), and --eval_only on one process against two. Two LMs: the toy world's
    (4 layers, width 128) and opt-125m's shapes with random weights (written in the hub layout by transformers),
    each on cached encoder features (toy ViT / ViT-B shapes). Medians over `repeats` runs each."""
    import transformers
    root = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        setups = {"toy LM": [], "opt-125m": [f"--lm={tmp / 'opt-125m'}", f"--encoder={tmp / 'vit-base'}",
                                             "--num_levels=6", "--inject_start=None", "--inject_end=None",
                                             "--batch_size=8", "--lr=1e-3", "--prompt_lr=1e-3"]}
        if "opt-125m" in lms:
            torch.manual_seed(0)
            transformers.OPTForCausalLM(hf_config("opt", "opt-125m")).save_pretrained(tmp / "opt-125m")
            transformers.ViTModel(hf_config("vit", "base"), add_pooling_layer=False).save_pretrained(tmp / "vit-base")
            for f in ("vocab.json", "merges.txt"):  # the real OPT tokenizer, kept with the tests
                (tmp / "opt-125m" / f).write_bytes((root / "tests" / "data" / "tokenizer" / "opt" / f).read_bytes())
        for name in lms:
            flags = setups[name]
            common = ["--modality=image", f"--max_iters={iters}", f"--eval_interval={iters}", "--log_interval=5",
                      "--toy_train_samples=256", "--toy_eval_samples=64", "--blind_control=False", *flags]
            row = {}
            for mode in ("ddp", "fsdp"):
                rates, mib = [], None
                for r in range(repeats):
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(root / "train.py"),
                           *common, f"--out_dir={tmp / name / mode}", *(["--fsdp"] if mode == "fsdp" else [])]
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
                    if p.returncode:
                        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr[-2000:]}")
                    log = [json.loads(x) for x in (tmp / name / mode / "log.jsonl").read_text().splitlines()]
                    steps = [x["samples_per_s"] for x in log if "samples_per_s" in x][-(iters // 5 - 1):]
                    rates.append(statistics.median(steps))  # the first interval holds start-up costs
                    (tmp / name / mode / "log.jsonl").unlink()
                    m = re.search(r"frozen weights ([\d.,]+) MiB on this process, ([\d.,]+) MiB in all", p.stdout)
                    mib = tuple(float(v.replace(",", "")) for v in m.groups()) if m else mib
                row[f"{mode}_samples_per_s"] = statistics.median(rates)
                if mib:
                    row["fsdp_frozen_mib_per_process"], row["frozen_mib"] = mib
            row["fsdp_step_time_vs_ddp"] = row["ddp_samples_per_s"] / row["fsdp_samples_per_s"]
            evals = {}
            for procs in (1, 2):
                times = []
                for r in range(repeats):
                    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node=2"] if procs == 2
                                                 else [])
                    cmd = [*launch, str(root / "train.py"), "--eval_only", f"--out_dir={tmp / name / 'ddp'}",
                           "--toy_eval_samples=64", "--batch_size=8", "--num_beams=3", "--max_new_tokens=16"]
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
                    if p.returncode:
                        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr[-2000:]}")
                    times.append(float(re.search(r"held-out items in ([\d.]+) s", p.stdout).group(1)))
                evals[procs] = statistics.median(times)
            row.update(eval_1_process_s=evals[1], eval_2_processes_s=evals[2], eval_speedup=evals[1] / evals[2])
            out[name] = row
    notes.append("distributed: torchrun, 2 CPU processes of 1 thread each (gloo), train.py on cached features; "
                 "evaluation: 64 held-out items in batches of 8, 3 beams, 16 new tokens, 1 process (1 thread) vs 2")
    return out


# the printed summary, per table: the results section, the key that marks a row there (a dict at any depth, labelled
# by the keys leading to it), the table's title, then (column title, key of the row and its format, or a function
# of the row); a key the row lacks prints "-"
MIB = 2 ** 20
TABLES = [
    ("distributed", "ddp_samples_per_s", "train.py, 2 processes", [
        ("DDP samples/s", "ddp_samples_per_s", ".1f"), ("FSDP samples/s", "fsdp_samples_per_s", ".1f"),
        ("FSDP step/DDP", "fsdp_step_time_vs_ddp", ".2f"), ("FSDP MiB/proc", "fsdp_frozen_mib_per_process", ".1f"),
        ("MiB in all", "frozen_mib", ".1f")]),
    ("distributed", "eval_speedup", "--eval_only", [
        ("1 process s", "eval_1_process_s", ".2f"), ("2 processes s", "eval_2_processes_s", ".2f"),
        ("speed-up", "eval_speedup", ".2f")]),
    ("backbones", "speedup", "backbone forward (fp32 eager)", [
        ("batch", "batch", "d"), ("ours s", "ours_s", ".3f"), ("transformers s", "transformers_s", ".3f"),
        ("speedup", "speedup", ".2f"), ("compiled x", "compile_speedup", ".2f")]),
    ("backbones", "train_speedup", "backbone forward+backward", [
        ("batch", "batch", "d"), ("ours s", "train_ours_s", ".3f"), ("transformers s", "train_transformers_s", ".3f"),
        ("speedup", "train_speedup", ".2f")]),
    ("train_step", "tflop", "train step", [
        ("s", "s", ".3f"), ("samples/s", "samples_per_s", ".2f"), ("TFLOP", "tflop", ".3f"), ("MFU", "mfu", ".0%"),
        ("saved MiB", "saved_mib", ".1f")]),
    ("train_step", "cached_vs_plain", "train step", [
        ("cached/plain", "cached_vs_plain", ".2f"), ("prefix/late s", "noprompt_vs_input_prefix", ".2f"),
        ("prefix/late MiB", "saved_input_prefix_vs_noprompt", ".2f"), ("matmul GFLOP/s", "matmul_gflops", ".0f")]),
    ("generate", "same_tokens", "generate", [
        ("family", "family", ""), ("new x batch", lambda r: f"{r['new_tokens']}x{r['batch']}"),
        ("ours s", "ours_s", ".4f"), ("transformers s", "transformers_s", ".4f"), ("speedup", "speedup", ".2f"),
        ("compiled x", "compiled_speedup", ".2f"), ("same tokens", "same_tokens", "")]),
    ("memory", "param_bytes", "memory (one step)", [
        ("frozen MiB", lambda r: f"{sum(v for k, v in r['param_bytes'].items() if k.endswith('frozen')) / MIB:.0f}"),
        ("step extra MiB", lambda r: f"{r['step_extra_bytes'] / MIB:.0f}"),
        ("peak MiB", lambda r: f"{r['rss_peak_step'] / MIB:.0f}"), ("frozen grads", "frozen_params_with_grad", "")]),
    ("accelerator", "tflops", "step (bf16)", [
        ("samples/s", "samples_per_s", ".1f"), ("tokens/s", "tokens_per_s", ".0f"), ("TFLOP/s", "tflops", ".0f"),
        ("MFU", "mfu", ".0%")]),
    ("quantize_bytes", "embedding_share", "bytes per parameter, bf16 and quantized", [
        ("params (B)", lambda r: f"{r['params'] / 1e9:.2f}"), ("embedding", "embedding_share", ".1%"),
        *((label, (lambda lb: lambda r: f"{r[lb]['bytes_per_param']:.3f}")(label))
          for label in ("bf16", "int8", "int4-g32", "int4-g64", "int4-g128"))]),
    ("quantize", "logit_rel_error", "quantized vs fp32 (same weights)", [
        ("logit error", "logit_rel_error", ".4f"), ("top-1 agree", "top1_agreement", ".3f"),
        ("greedy agree", "greedy_token_agreement", ".3f"), ("same rows", "greedy_same_rows", "d"),
        ("step x fp32", "step_vs_fp32", ".2f"), ("greedy x fp32", "greedy_vs_fp32", ".2f"),
        ("bytes/param", "bytes_per_param", ".3f")]),
    ("quantize", "reading_attribute_accuracy", "toy LM reading test (trained)", [
        ("attribute acc", "reading_attribute_accuracy", ".3f"), ("image", "reading_image", ".3f"),
        ("audio", "reading_audio", ".3f"), ("video", "reading_video", ".3f")]),
    ("quantize_loading", "peak_extra_bytes", "loading (CPU, float32)", [
        ("model MiB", lambda r: f"{r['model_bytes'] / MIB:.0f}"),
        ("peak MiB", lambda r: f"{r['peak_extra_bytes'] / MIB:.0f}"),
        ("largest fp32 MiB", lambda r: f"{r['largest_weight_fp32_bytes'] / MIB:.0f}"),
        ("layer fp32 MiB", lambda r: f"{r['layer_fp32_bytes'] / MIB:.0f}")]),
    ("accelerator_quantize", "weights_gb", "quantized LM on the accelerator", [
        ("weights GB", "weights_gb", ".2f"), ("greedy tok/s", "greedy_tokens_per_s", ".0f"),
        *((f"b{b} {c}", (lambda b, k, f: lambda r: format(r[f"batch{b}"][k], f) if k in r.get(f"batch{b}", {})
                         else "-")(b, k, f)) for b in (8, 64) for c, k, f in
          (("samples/s", "samples_per_s", ".1f"), ("peak GiB", "peak_memory_gib", ".2f")))]),
    ("accelerator_generate", "coco_ours_s", "generation (3 beams, 30 tokens)", [
        ("ours tok/s", "ours_tokens_per_s", ".0f"), ("compiled tok/s", "ours_compiled_tokens_per_s", ".0f"),
        ("transf. tok/s", "transformers_tokens_per_s", ".0f"), ("COCO ours s", "coco_ours_s", ".0f"),
        ("COCO transf. s", "coco_transformers_s", ".0f")]),
]


def rows(tree: dict, key: str, label: str = ""):
    """(label, row) for every dict under tree that holds key, labelled by the keys leading to it."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from [(f"{label}{k}", v)] if key in v else rows(v, key, f"{label}{k} ")


def cell(row: dict, column: tuple) -> str:
    _, key, *spec = column
    return key(row) if callable(key) else format(row[key], *spec) if key in row else "-"


def print_table(results: dict) -> None:
    print(f"\nbench.py --{results['mode']} on {results['machine']}")
    if "matmul" in results:
        print(f"matmul fp32: {results['matmul']['gflops']:.1f} GFLOP/s (n={results['matmul']['n']})")
    if "accelerator" in results:
        print(f"accelerator {results['accelerator']['device']}: matmul "
              f"{results['accelerator']['matmul_tflops']:.1f} TFLOP/s")
    for section, key, title, columns in TABLES:
        lines = [[label, *(cell(r, c) for c in columns)] for label, r in rows(results.get(section, {}), key)]
        for line in [[title, *(c[0] for c in columns)], *lines] if lines else []:
            print(f"{line[0]:<34}" + "".join(f"  {c:>14}" for c in line[1:]))
    for note in results["notes"]:
        print("note:", note)
    print(f"total {results['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CPU, every section on small batches, < 3 min")
    group.add_argument("--tiny", action="store_true", help="toy shapes, seconds: a smoke test for CI")
    parser.add_argument("--opt-1.3b", dest="opt13", action="store_true", help="full mode: add opt-1.3b")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the accelerator sections")
    parser.add_argument("--generation", action="store_true", help="only the generation section(s)")
    parser.add_argument("--llama", action="store_true",
                        help="only the Llama rows of the backbone and generation sections (SmolLM2-135M's shape)")
    parser.add_argument("--distributed", action="store_true",
                        help="only train.py under torchrun on 2 CPU processes: DDP vs FSDP, evaluation 1 vs 2")
    parser.add_argument("--out", default="bench.json", help="where the JSON results go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs behind each median (default: the mode's; 1 is a smoke test, not a timing)")
    parser.add_argument("--quantize", action="store_true",
                        help="only the quantization rows: int8 and int4 against full precision (bytes per parameter "
                             "of the paper's LMs, logit error, step and generation, loading memory; with --device "
                             "cuda: the GPU's step, memory and generation)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--load-child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    if args.load_child:
        print(json.dumps(load_child(*args.load_child)))
        return
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device!r}: expected cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    mode = dict(MODES[mode_name])
    if args.opt13:
        mode["lms"] = mode["lms"] + ["opt-1.3b"]
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats {args.repeats}: expected at least 1")
        mode["repeats"] = args.repeats
        mode["gen_lms"] = [(name, batch, new, args.repeats) for name, batch, new, _ in mode["gen_lms"]]
    t0 = time.perf_counter()
    notes = []
    results = {"mode": mode_name, "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "notes": notes}
    if args.distributed:
        results["distributed"] = bench_distributed(notes, repeats=min(3, mode["repeats"]))
    elif args.device == "cuda" and args.quantize:
        results["accelerator_quantize"] = bench_quantize_accelerator(mode["repeats"], notes)
    elif args.quantize:
        results["quantize_bytes"] = bench_quantize_bytes()
        results["quantize"] = bench_quantize(mode, notes)
        results["quantize_loading"] = bench_quantize_loading(*mode["quant_load"], notes)
    elif args.device == "cuda":
        if not args.generation:
            results["accelerator"] = bench_accelerator(mode["repeats"], notes)
        results["accelerator_generate"] = bench_accelerator_generate(mode["repeats"], notes)
    elif args.llama:
        results["backbones"] = bench_backbones(dict(mode, lms=[], encoders=[]), "cpu", notes)
        results["generate"] = bench_generate(
            dict(mode, gen_lms=[g for g in mode["gen_lms"] if lm_kind(g[0]) == "llama"]), "cpu", notes)
    elif args.generation:
        results["generate"] = bench_generate(mode, "cpu", notes)
    else:
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if "avx512_bf16" not in flags and "amx_bf16" not in flags:
            notes.append("bf16 compute variants skipped: this CPU has no native bf16 (no avx512_bf16 / amx_bf16); "
                         "bf16 appears only in the memory section")
        n = mode["matmul_n"]
        rate = matmul_rate(n, torch.float32, "cpu", mode["repeats"] + 2)
        results["matmul"] = {"n": n, "gflops": rate / 1e9}
        results["backbones"] = bench_backbones(mode, "cpu", notes)
        results["train_step"] = bench_train_step(mode, "cpu", notes)
        results["generate"] = bench_generate(mode, "cpu", notes)
        results["memory"] = bench_memory(mode_name, notes)
    results["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
