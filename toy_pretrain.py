"""Pretraining the toy backbones of the miniature world (toy.py), each on one modality like the real ones, and
saving them in the official hub layout under toy/, where they load through the same `from_pretrained`.

A 4-layer OPT on the world's text only (with its own byte-level BPE), a 4-layer Llama (rotary, SwiGLU, GQA, tied
like SmolLM2) on the same text with the same tokenizer and seeds, and a ViT, an AST and a TimeSformer trained on
media only to classify attributes (the ImageNet / AudioSet / Kinetics analogue). `python toy_pretrain.py` (or
`python toy.py`) regenerates them all (seeded); `python toy.py llama` only the named one(s).

The LM corpus is the lesson of this file: an LM trained on i.i.d. captions reaches the captions' entropy
and never learns to read its context, so no injected token can steer it (measured: 42% held-out attribute
accuracy with ideal media features). Documents here put the attribute words first, in random order, then
`</s>`, then a caption or a question and its answer: later words depend on earlier ones, so the LM learns to
look back and copy, which is what eP-ALM exploits (same measurement: 100%).

References: Shukor et al., eP-ALM (ICCV 2023); karpathy/nanoGPT's shakespeare_char for the spirit.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fbank import AST_MEAN, AST_STD
from toy import (ATTRIBUTES, ENCODER_OF, IMAGE_SIZE, MODALITIES, NUM_FRAMES, QA_SEPARATOR, SAMPLE_RATE, TOY_DIR,
                 VIDEO_SIZE, attribute_accuracy, caption, combinations, questions, samples)


# ---- the LM's text ----

def lm_corpus(n_docs: int = 60000, seed: int = 0) -> list[str]:
    """Pretraining documents of the toy LM, each ending with `</s>` (the tokenizer prepends the BOS `</s>`).

    Most documents are " attribute words in random order</s>caption</s>" or "...</s>question? </a> answer</s>":
    the caption or answer is predictable only by reading the words before it, so the LM must learn to look
    back and copy. The random order makes that lookup by meaning (the colour word, wherever it is) rather
    than by position, which is how one injected token at position 0 can later be read. A fifth are bare
    captions or questions (no context), so the LM also knows the prior, as real text does. All
    combinations appear: held-out combinations are held out of multimodal training, not out of language."""
    rng = np.random.default_rng(seed)
    every = {m: combinations(m, "train") + combinations(m, "heldout") for m in MODALITIES}
    docs = []
    for _ in range(n_docs):
        m = MODALITIES[rng.integers(len(MODALITIES))]
        combo = every[m][rng.integers(len(every[m]))]
        words = list(combo.values())
        context = "".join(" " + words[i] for i in rng.permutation(len(words))) + "</s>"  # " red": the caption's token
        if rng.random() < 0.5:
            text = caption(m, combo)
        else:
            q, a = questions(m, combo)[rng.integers(len(questions(m, combo)))]
            text = q + QA_SEPARATOR + a
        docs.append((context if rng.random() < 0.8 else "") + text + "</s>")
    return docs


def train_tokenizer(docs: list[str], folder: Path, vocab_size: int = 512, layout: str = "opt") -> None:
    """Byte-level BPE like OPT's (GPT-2 bytes, no prefix space), ids <s>=0 <pad>=1 </s>=2 <unk>=3, saved as
    vocab.json + merges.txt (layout "opt"), or as one tokenizer.json that prepends `</s>` as BOS (layout
    "llama": the same merges and ids, the file the Llama family ships). Trained on the text between the `</s>`
    markers, so no merge crosses one."""
    from tokenizers import ByteLevelBPETokenizer, processors

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    segments = (part for doc in docs for part in doc.split("</s>") if part)
    tokenizer.train_from_iterator(segments, vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "opt":
        tokenizer.save_model(str(folder))
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B:1", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    tokenizer.save(str(folder / "tokenizer.json"))


def encode_docs(tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) ids (the tokenizer's <pad>) and their 0/1 attention mask."""
    ids = [e.ids for e in tokenizer.encode_batch(docs)]
    out = torch.full((len(ids), max(map(len, ids))), tokenizer.token_to_id("<pad>"), dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, row in enumerate(ids):
        out[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return out, mask


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2/OPT initialisation: N(0, 0.02) weights and embeddings, zero biases (PyTorch's defaults give an
    N(0, 1) embedding, whose tied logits start with a loss near 80)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():  # the encoders' position/time embeddings and [CLS] start at zero
        if name.split(".")[-1] in ("pos_embed", "cls_token", "dist_token"):
            nn.init.trunc_normal_(p, 0.0, std)
        if name == "time_embed":  # at 0.02 the frames stay unordered: direction was 55% after 2000 steps, 99.7% at 1.0
            nn.init.normal_(p, 0.0, 1.0)
    return model


def train_lm(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, batch: int = 64, lr: float = 3e-3,
             seed: int = 0, log=print) -> float:
    """Next-token pretraining of a toy LM (OPT or Llama) on the encoded corpus. Returns the mean loss of the last
    100 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    lm.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        rows = torch.randint(len(ids), (batch,), generator=gen)
        x, m = ids[rows], mask[rows]
        T = int(m.sum(1).max())
        x, m = x[:, :T], m[:, :T]
        logits = lm(x, m)
        targets = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps - 1:
            log(f"lm step {step}: loss {np.mean(losses[-100:]):.3f}")
    lm.eval()
    return float(np.mean(losses[-100:]))


# ---- the toy encoders: pretrained on media only, to classify attributes ----

# ours -> the official HF layout (the inverse of encoder_parts.HF_RULES and timesformer.HF_TIMESFORMER_RULES)
TO_HF = [
    (r"^cls_token$", "embeddings.cls_token"), (r"^dist_token$", "embeddings.distillation_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"), (r"^time_embed$", "embeddings.time_embeddings"),
    (r"^patch_embed\.", "embeddings.patch_embeddings.projection."),
    (r"^layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^layers\.(\d+)\.attn\.qkv\.", r"encoder.layer.\1.attention.attention.qkv."),
    (r"^layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.temporal_norm1\.", r"encoder.layer.\1.temporal_layernorm."),
    (r"^layers\.(\d+)\.temporal_attn\.qkv\.", r"encoder.layer.\1.temporal_attention.attention.qkv."),
    (r"^layers\.(\d+)\.temporal_attn\.proj\.", r"encoder.layer.\1.temporal_attention.output.dense."),
    (r"^layers\.(\d+)\.temporal_fc\.", r"encoder.layer.\1.temporal_dense."),
    (r"^norm\.", "layernorm."),
]


def encoder_hf_state(model: nn.Module, split_qkv: bool) -> dict[str, torch.Tensor]:
    """The encoder's weights under HF key names; ViTModel and ASTModel store query/key/value apart."""
    import re

    out = {}
    for key, t in model.state_dict().items():
        for pattern, repl in TO_HF:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            raise KeyError(f"toy encoder parameter {key!r} has no HF name")
        if split_qkv and ".attention.attention.qkv." in key:
            for name, part in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                out[key.replace(".qkv.", f".{name}.")] = part.contiguous()
        else:
            out[key] = t.contiguous()
    return out


ENCODER_COMMON = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256,
                  "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                  "initializer_range": 0.02, "qkv_bias": True}
HF_CONFIGS = {  # config.json of each toy encoder, in the fields of the official checkpoints
    "vit": {"model_type": "vit", "architectures": ["ViTModel"], **ENCODER_COMMON, "layer_norm_eps": 1e-12,
            "image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3, "encoder_stride": 8},
    "ast": {"model_type": "audio-spectrogram-transformer", "architectures": ["ASTModel"], **ENCODER_COMMON,
            "layer_norm_eps": 1e-12, "patch_size": 16, "frequency_stride": 16, "time_stride": 8,
            "max_length": 100, "num_mel_bins": 128},
    "timesformer": {"model_type": "timesformer", "architectures": ["TimesformerModel"], **ENCODER_COMMON,
                    "layer_norm_eps": 1e-6, "image_size": VIDEO_SIZE, "patch_size": 8, "num_channels": 3,
                    "num_frames": NUM_FRAMES, "attention_type": "divided_space_time", "drop_path_rate": 0},
}
PREPROCESSOR_CONFIGS = {
    "vit": {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "ast": {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": SAMPLE_RATE,
            "num_mel_bins": 128, "max_length": 100, "padding_value": 0.0, "return_attention_mask": False,
            "do_normalize": True, "mean": AST_MEAN, "std": AST_STD},
    "timesformer": {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": VIDEO_SIZE}, "do_center_crop": True,
                    "crop_size": {"height": VIDEO_SIZE, "width": VIDEO_SIZE}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.45] * 3,
                    "image_std": [0.225] * 3},
}


def new_encoder(name: str) -> nn.Module:
    """A freshly initialised toy encoder of the project's own architecture, from its HF config."""
    if name == "vit":
        import vit
        return init_weights(vit.ViT(vit.ViTConfig.from_dict(HF_CONFIGS[name])))
    if name == "ast":
        import ast_audio
        return init_weights(ast_audio.AST(ast_audio.ASTConfig.from_dict(HF_CONFIGS[name])))
    import timesformer
    return init_weights(timesformer.TimeSformer(timesformer.TimeSformerConfig.from_dict(HF_CONFIGS[name])))


def media_batch(modality: str, encoder: nn.Module, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> (the encoder's preprocessed input, (N, n_attributes) value indices)."""
    x = encoder.preprocess([it["media"] for it in items])
    attrs = ATTRIBUTES[modality]
    y = torch.tensor([[vs.index(it["combo"][a]) for a, vs in attrs.items()] for it in items])
    return x, y


def train_encoder(modality: str, encoder: nn.Module, n_train: int = 2000, steps: int = 600, batch: int = 64,
                  lr: float = 2e-3, seed: int = 0, log=print) -> dict[str, float]:
    """Classification pretraining: one linear head per attribute on the final [CLS] (the heads are thrown away,
    like ImageNet classifiers), on media of every combination. Trained on the train combinations only, the
    3-layer ViT learnt shape through combination shortcuts (47% on held-out combinations, 83% on fresh media
    of train ones), which would test the toy encoder rather than eP-ALM: held-out combinations are held out of
    everything multimodal instead. n_train > 0: a fixed set of media; 0: fresh media every step.
    Returns the accuracy per attribute on media of held-out combinations."""
    torch.manual_seed(seed)
    if n_train:
        x, y = media_batch(modality, encoder, samples(modality, "all", n_train, seed=seed))
    heads = nn.ModuleList(nn.Linear(encoder.hidden_size, len(vs)) for vs in ATTRIBUTES[modality].values())
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        if n_train:
            rows = torch.randint(len(x), (batch,), generator=gen)
            xb, yb = x[rows], y[rows]
        else:  # fresh media every step
            xb, yb = media_batch(modality, encoder, samples(modality, "all", batch, seed=seed * 1_000_003 + step))
        cls = encoder(xb, last=1)[-1][:, 0]
        loss = sum(F.cross_entropy(head(cls), yb[:, i]) for i, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"{ENCODER_OF[modality]} step {step}: loss {loss.item():.3f}")
    encoder.eval()
    hx, hy = media_batch(modality, encoder, samples(modality, "heldout", 300, seed=seed + 1))
    with torch.no_grad():
        cls = encoder(hx, last=1)[-1][:, 0]
    return {a: (head(cls).argmax(1) == hy[:, i]).float().mean().item()
            for i, (a, head) in enumerate(zip(ATTRIBUTES[modality], heads))}


# ---- saving in the official hub layout, and building everything ----

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_encoder(name: str, encoder: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", HF_CONFIGS[name])
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIGS[name])
    save_file(encoder_hf_state(encoder, split_qkv=name != "timesformer"), str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def lm_hf_config(vocab_size: int) -> dict:
    return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": vocab_size,
            "hidden_size": 128, "num_hidden_layers": 4, "ffn_dim": 512, "num_attention_heads": 4,
            "max_position_embeddings": 64, "word_embed_proj_dim": 128, "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "activation_function": "relu", "enable_bias": True,
            "layer_norm_elementwise_affine": True, "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0,
            "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
            "tie_word_embeddings": True, "use_cache": True}


def llama_hf_config(vocab_size: int) -> dict:
    """The toy OPT's width, depth and about its parameter count (the SwiGLU's three matrices at 384 where OPT has
    two at 512; grouped-query attention stores fewer k and v weights), in SmolLM2's layout: tied embeddings, no
    biases. `</s>` is BOS and EOS as in the toy OPT, so the world's text layout `</s> ... </s>` is unchanged."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
            "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
            "tie_word_embeddings": True, "use_cache": True}


# our layer's module -> the submodule transformers puts it in (OPT's fc1 / fc2 and layer norms sit in the layer)
HF_SUBMODULE = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "out_proj", "o_proj"), "self_attn"),
                **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp")}


def save_lm(lm: nn.Module, folder: Path, config: dict) -> None:
    """config.json + model.safetensors with OPTForCausalLM's keys (model.decoder.*) or LlamaForCausalLM's
    (model.*); lm_head tied, not stored."""
    from safetensors.torch import save_file

    prefix = "model.decoder." if config["model_type"] == "opt" else "model."
    state = {}
    for key, t in lm.state_dict().items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] in HF_SUBMODULE:
            key = ".".join(parts[:2] + [HF_SUBMODULE[parts[2]]] + parts[2:])
        state[prefix + key] = t.contiguous()
    _write_json(folder / "config.json", config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# pretraining steps: at 1500 the toy Llama copied every attribute but the kind of sound (reading test: kind 38%,
# "beep" or "buzzes" from the count alone), and eP-ALM on it left kind near chance; at 3000 it reads them all
LM_STEPS = {"opt": 1500, "llama": 3000}


def build_lm(folder: Path, family: str = "opt", steps: int | None = None, log=print) -> float:
    """The toy LM of a family (opt, llama): the same corpus, tokenizer merges, seeds and training recipe."""
    import llama
    import opt

    docs = lm_corpus()
    train_tokenizer(docs, folder, layout=family)
    tokenizer = opt.load_tokenizer(str(folder))  # vocab.json + merges.txt, or tokenizer.json as it is
    vocab_size = -(-tokenizer.get_vocab_size() // 8) * 8
    config = (lm_hf_config if family == "opt" else llama_hf_config)(vocab_size)
    cls, config_cls = (opt.OPT, opt.OPTConfig) if family == "opt" else (llama.Llama, llama.LlamaConfig)
    torch.manual_seed(0)
    lm = init_weights(cls(config_cls.from_dict(config)))
    ids, mask = encode_docs(tokenizer, docs)
    loss = train_lm(lm, ids, mask, steps or LM_STEPS[family], log=log)
    save_lm(lm, folder, config)
    _check_reload(cls, lm, folder, ids[:8], mask[:8])
    return loss


def reading_test(lm: nn.Module, tokenizer, seed: int = 0) -> dict[str, dict[str, float]]:
    """Does the LM read its context? For every held-out combination of each modality: its attribute words in a
    random order, `</s>`, and the LM's greedy continuation scored as a caption (toy.attribute_accuracy).

    eP-ALM cannot teach a frozen LM to read: the adapter only writes into a residual stream that the LM already
    knows how to look back at. An attribute the LM does not copy from these words stays near chance after
    adaptation (the toy Llama's kind of sound did, at 1500 pretraining steps), so each build reports this."""
    rng = np.random.default_rng(seed)
    eos = tokenizer.token_to_id("</s>")
    out = {}
    with torch.no_grad():
        for m in MODALITIES:
            pairs = []
            for combo in combinations(m, "heldout"):
                words = list(combo.values())
                ids = tokenizer.encode("".join(" " + words[i] for i in rng.permutation(len(words))) + "</s>").ids
                start = len(ids)
                while len(ids) < start + 16 and (len(ids) == start or ids[-1] != eos):
                    ids.append(int(lm(torch.tensor([ids]))[0, -1].argmax()))
                pairs.append(({"combo": combo}, tokenizer.decode(ids[start:])))
            out[m] = attribute_accuracy(m, pairs)
    return out


def reading_summary(scores: dict[str, dict[str, float]]) -> str:
    """Each modality's attribute accuracy and any attribute under 95%, e.g. "reads its context: image 100%,
    audio 84% (kind 38%), video 100%"."""
    parts = []
    for m, acc in scores.items():
        weak = [f"{k.removesuffix(' accuracy')} {100 * v:.0f}%" for k, v in acc.items()
                if k != "attribute accuracy" and v < 0.95]
        parts.append(f"{m} {100 * acc['attribute accuracy']:.0f}%" + (f" ({', '.join(weak)})" if weak else ""))
    return "reads its context: " + ", ".join(parts)


def _check_reload(cls, model: nn.Module, folder: Path, *inputs) -> None:
    """The saved folder, read back through the public from_pretrained, must give the trained model's outputs."""
    loaded = cls.from_pretrained(str(folder))
    with torch.no_grad():
        a, b = model(*inputs), loaded(*inputs)
    a, b = (a[-1], b[-1]) if isinstance(a, list) else (a, b)
    if not torch.allclose(a, b, atol=1e-5):
        raise RuntimeError(f"{folder}: reloaded checkpoint differs from the trained model")


ENCODER_STEPS = {"vit": 2000, "ast": 1000, "timesformer": 1500}


def build_encoder(name: str, folder: Path, log=print) -> dict[str, float]:
    modality = {v: k for k, v in ENCODER_OF.items()}[name]
    encoder = new_encoder(name)
    accuracy = train_encoder(modality, encoder, steps=ENCODER_STEPS[name], n_train=0, log=log)
    save_encoder(name, encoder, folder)
    x, _ = media_batch(modality, encoder, samples(modality, "heldout", 4, seed=99))
    _check_reload(type(encoder), encoder, folder, x)
    return accuracy


BACKBONES = ("lm", "llama", "vit", "ast", "timesformer")


def build(which=BACKBONES, out: Path = TOY_DIR, log=print) -> None:
    """Train and save the toy backbones (seeded) under out/ (toy/); `python toy.py [NAME ...] [--out DIR]`."""
    import llama
    import opt

    for name in which:
        if name not in BACKBONES:
            raise ValueError(f"toy backbone {name!r} is not one of {', '.join(BACKBONES)}")
        t0 = time.time()
        torch.manual_seed(0)
        if name in ("lm", "llama"):
            loss = build_lm(out / name, "opt" if name == "lm" else "llama", log=log)
            lm = (opt.OPT if name == "lm" else llama.Llama).from_pretrained(str(out / name))
            result = f"final loss {loss:.3f}; " + reading_summary(reading_test(lm, opt.load_tokenizer(str(out / name))))
        else:
            accuracy = build_encoder(name, out / name, log=log)
            result = "held-out accuracy " + ", ".join(f"{a} {100 * v:.1f}%" for a, v in accuracy.items())
        log(f"{out / name}: {result} ({time.time() - t0:.0f} s)")
        record_build(out / name, result)


def record_build(folder: Path, result: str) -> None:
    """folder/build.json: what built it (command, seed, library versions, machine). The same code and seed give
    other bytes under other torch builds or CPUs (toy/BUILD.md), so a checkpoint says where it came from."""
    import platform
    import sys

    import PIL
    import tokenizers
    _write_json(folder / "build.json", {
        "command": "python toy.py " + " ".join(sys.argv[1:]), "seed": 0, "result": result,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "tokenizers": tokenizers.__version__},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")})


def main(argv: list[str]) -> None:
    """`python toy.py [NAME ...] [--out DIR]`: build the named toy backbones (all without a name), e.g. only
    `llama`, into toy/ or into DIR (to compare a rebuild with the shipped files: train.py --lm DIR/lm ...)."""
    names, out = [], TOY_DIR
    for i, a in enumerate(argv):
        if a.startswith("--out=") or a == "--out":
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise SystemExit("error: --out: expected a folder to build the backbones in")
            out = Path(value)
        elif not (i > 0 and argv[i - 1] == "--out"):
            names.append(a)
    for name in names:
        if name not in BACKBONES:
            raise SystemExit(f"error: toy backbone {name!r} is not one of {', '.join(BACKBONES)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    build(names or BACKBONES, out)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
