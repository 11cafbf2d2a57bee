"""Train eP-ALM: a frozen LM and a frozen encoder, with a linear connector and a soft prompt trained on top.

    python train.py --modality=audio                      # the miniature world (toy.py), minutes on a CPU
    python train.py --modality=image --task=vqa           # ... answering questions instead of captioning
    python train.py --modality=image --dataset=coco --data=/data/coco \\
        --lm=facebook/opt-2.7b --encoder=google/vit-base-patch16-224   # the real thing (a GPU)
    torchrun --nproc_per_node=8 train.py ...              # several GPUs (DDP over the adaptation parameters)
    python train.py --eval_only --out_dir=out/image-caption   # score a checkpoint, write its predictions

Configuration is nanoGPT's: the defaults below, then the toy world's preset (when dataset is toy), then an
optional JSON file given as a bare argument, then --key=value flags.
"""
import ast
import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import datasets
import hub
import metrics
import toy
from media import MediaError
from model import EPALM, EPALMConfig, from_checkpoint, load_backbones, save_adapter

# ---- configuration ----
modality = "image"          # image | audio | video
task = "caption"            # caption | vqa
dataset = "toy"             # toy | coco | vqav2 | gqa | audiocaps | msrvtt | msrvtt_qa
data_dir = ""               # the data set's root folder (not for toy)
lm = ""                     # "" = the toy LM; else a hub id or folder, e.g. facebook/opt-2.7b
encoder = ""                # "" = the modality's toy encoder; else e.g. google/vit-base-patch16-224
out_dir = ""                # "" = out/{modality}-{task}
init_from = "scratch"       # scratch | resume
eval_only = False
# eP-ALM (model.py): the pt-L recipe by default
num_levels = 6
inject_start = None         # None: OPT-2.7B's window 19..31 of 32 scaled to the LM's depth
inject_end = None
inject = "late"             # late | input (ablation: the last level's token only, as a prefix at layer 0)
shared_connector = True
prompt_length = 10
prompt_mlp = False
# optimisation
max_iters = 20000
batch_size = 16
grad_accum = 1
lr = 2e-4                   # connector
prompt_lr = 1e-3
weight_decay = 0.02
warmup_iters = 1000
lr_decay_iters = None       # None = max_iters (set it to stop early and resume on the same schedule)
min_lr_ratio = 0.1
grad_clip = 1.0
augment = True              # train-time augmentation (image crop/flip, SpecAugment, frame offsets)
cache_features = False      # encode each media file once and train on the stored [CLS] tokens (no augment)
num_workers = 4
# evaluation and logging
eval_interval = 1000
eval_samples = 500          # held-out items scored (generation) at the end and by --eval_only; 0 = all
eval_split = "val"
num_beams = 3
max_new_tokens = 30
blind_control = False       # also train and score the same recipe with the media blanked
toy_train_samples = 4000    # the miniature world: media rendered for training / held-out scoring
toy_eval_samples = 300
log_interval = 10
seed = 1337
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # bf16 matmuls are ~500x slower on CPUs
compile = torch.cuda.is_available()                               # without bf16 instructions


def configure(argv: list[str], settings: dict) -> dict:
    """Apply the toy preset, a JSON file and --key=value flags to the defaults, with type checks."""
    files = [a for a in argv if not a.startswith("--")]
    flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "True") for a in argv if a.startswith("--"))
    chosen = {}
    for f in files:
        try:
            chosen.update(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"config file {f}: {e}")
    for k, v in flags.items():
        try:
            chosen[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            chosen[k] = v  # a bare string
    for k, v in chosen.items():
        if k not in settings:
            sys.exit(f"unknown setting --{k} (known: {', '.join(sorted(settings))})")
    merged = {**settings, **chosen}
    for k, allowed in [("modality", data.MODALITIES), ("task", ("caption", "vqa")), ("inject", ("late", "input")),
                       ("init_from", ("scratch", "resume")), ("dataset", ("toy", *datasets.DATASETS))]:
        if merged[k] not in allowed:
            sys.exit(f"--{k}={merged[k]}: expected one of {', '.join(allowed)}")
    if merged["dataset"] == "toy":
        chosen = {**toy.train_preset(merged["modality"], merged["task"]), **chosen}
    elif "task" not in chosen:
        chosen["task"] = datasets.DATASETS[merged["dataset"]].task
    kinds = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    for k, v in chosen.items():
        d = settings[k]
        if d is not None and v is not None and not isinstance(v, type(d)) and not (
                isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool)):
            sys.exit(f"--{k}={v!r}: expected {kinds[type(d)]}")
        settings[k] = float(v) if isinstance(d, float) and v is not None else v
    return settings


settings = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
settings = configure(sys.argv[1:], settings)
globals().update(settings)
out_dir = Path(out_dir or f"out/{modality}-{task}")

# ---- setup: devices, precision, distributed ----
ddp = "RANK" in os.environ
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
if ddp:
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
master = rank == 0
if dtype not in ("float32", "bfloat16", "float16"):
    sys.exit(f"--dtype={dtype}: expected float32, bfloat16 or float16")
ptdtype = getattr(torch, dtype)
device_type = "cuda" if device.startswith("cuda") else "cpu"
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
say = print if master else (lambda *a, **k: None)


def epalm_config() -> EPALMConfig:
    if inject == "input":  # the LiMBeR-style baseline: one token, prepended at the input layer
        return EPALMConfig(num_levels=1, inject_start=0, inject_end=1, shared_connector=True,
                           prompt_length=prompt_length, prompt_mlp=prompt_mlp)
    return EPALMConfig(num_levels=num_levels, inject_start=inject_start, inject_end=inject_end,
                       shared_connector=shared_connector, prompt_length=prompt_length, prompt_mlp=prompt_mlp)


def run_config() -> dict:
    """What a checkpoint must remember to be used again (sample.py, --eval_only, --init_from=resume)."""
    return {"modality": modality, "task": task, "dataset": dataset,
            "lm": lm or str(toy.TOY_DIR / "lm"), "encoder": encoder or str(toy.encoder_dir(modality)),
            "epalm": epalm_config().__dict__}


# ---- data ----
def load_examples(train_split: bool = True):
    if dataset == "toy":
        return (data.toy_examples(modality, task, "train", toy_train_samples, seed) if train_split else [],
                data.toy_examples(modality, task, "heldout", toy_eval_samples, seed + 1))
    return (datasets.read_dataset(dataset, data_dir, "train") if train_split else [],
            datasets.read_dataset(dataset, data_dir, eval_split))


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def micro_batches(n: int, first_step: int):
    """The example indices of each micro-step from `first_step` on: shuffled epochs, a pure function of
    (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    step = first_step
    while True:
        start, out = (step * world + rank) * batch_size, []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            out += epoch_order(n, epoch)[offset:offset + batch_size - len(out)]
        yield out
        step += 1


def batches(examples, features, tokenizer, transform, first_step: int, blind: bool):
    """Training batches from micro-step `first_step` on (see data.Collate for what a batch holds)."""
    loader = torch.utils.data.DataLoader(
        data.ExampleDataset(examples, transform, features), batch_sampler=micro_batches(len(examples), first_step),
        num_workers=0 if features is not None else num_workers, collate_fn=data.Collate(examples, tokenizer, blind=blind),
        pin_memory=device_type == "cuda")
    return iter(loader)


# ---- model, optimiser, schedule, checkpoints ----
def build_model():
    cfg = run_config()
    lm_, tokenizer, encoder_ = load_backbones(modality, cfg["lm"], cfg["encoder"],
                                              dtype=ptdtype if device_type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    return EPALM(lm_, encoder_, epalm_config()).to(device), tokenizer


def make_optimizer(model):
    """AdamW over the adaptation parameters only; the prompt has its own learning rate and no decay."""
    groups = {"decay": [], "no_decay": [], "prompt": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups["prompt" if n.startswith("prompt") else "decay" if p.dim() == 2 else "no_decay"].append(p)
    return torch.optim.AdamW([
        {"params": groups["decay"], "base_lr": lr, "weight_decay": weight_decay},
        {"params": groups["no_decay"], "base_lr": lr, "weight_decay": 0.0},
        {"params": groups["prompt"], "base_lr": prompt_lr, "weight_decay": 0.0}], lr=lr,
        fused=device_type == "cuda")


def lr_factor(it: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, (lr_decay_iters or max_iters) - warmup_iters))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(model, optimizer, it: int, run_dir: Path) -> None:
    """state.pt (everything to resume) then ckpt.safetensors (what sample.py needs), each written to a
    temporary file and renamed: a kill at any moment leaves the previous checkpoint whole."""
    state = {"iter": it, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "adapter": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}}
    tmp = run_dir / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / "state.pt")
    save_adapter(model, run_dir / "ckpt.safetensors", {**run_config(), "iter": it})


def load_state(model, optimizer, run_dir: Path) -> int:
    path = run_dir / "state.pt"
    if not path.exists():
        sys.exit(f"--init_from=resume: no {path} (train first, or check --out_dir)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        sys.exit(f"--init_from=resume: {path} is unreadable ({type(e).__name__}: {e})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["adapter"].items():
            if n not in params or params[n].shape != v.shape:
                sys.exit(f"--init_from=resume: {path} does not match this configuration (parameter {n})")
            params[n].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["iter"]


# ---- evaluation ----
def model_inputs(batch, features: bool):
    x = batch["media"].to(device, non_blocking=True) if batch["media"] is not None else None
    return (None, x) if features else (x, None)


@torch.no_grad()
def eval_loss(model, examples, features, tokenizer, transform, blind, max_batches=10) -> float:
    collate, losses = data.Collate(examples, tokenizer, blind=blind), []
    for start in range(0, min(len(examples), max_batches * batch_size), batch_size):
        idx = range(start, min(start + batch_size, len(examples)))
        batch = collate([(i, features[i] if features is not None else transform(examples[i].media)) for i in idx])
        media, feats = model_inputs(batch, features is not None)
        with autocast:
            _, loss = model(media, batch["ids"].to(device), batch["mask"].to(device), batch["targets"].to(device),
                            features=feats)
        losses.append(loss.item())
    return sum(losses) / max(1, len(losses))


@torch.no_grad()
def predict(model, examples, features, tokenizer, transform, blind, desc="generating") -> dict[str, str]:
    """Generated text per example id (undecodable media are left out)."""
    collate, preds = data.Collate(examples, tokenizer, blind=blind, with_target=False), {}
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False,
                      disable=not master):
        items = []
        for i in range(start, min(start + batch_size, len(examples))):
            try:
                items.append((i, features[i] if features is not None else transform(examples[i].media)))
            except MediaError as e:
                say(f"warning: skipped {e}", file=sys.stderr)
        batch = collate(items)
        if not batch["index"]:
            continue
        media, feats = model_inputs(batch, features is not None)
        with autocast:
            out = model.generate(media, batch["ids"].to(device), batch["mask"].to(device), features=feats,
                                 max_new_tokens=max_new_tokens, num_beams=num_beams)
        for i, tokens in zip(batch["index"], out):
            preds[examples[i].id] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return preds


def score(examples, preds: dict[str, str]) -> dict[str, float]:
    """The paper's metrics (CIDEr / BLEU for captions, VQA accuracy or exact match for answers), exact match,
    and in the toy world the accuracy per attribute."""
    examples = [e for e in examples if e.id in preds]
    if not examples:
        return {}
    out = {}
    if task == "caption":
        out.update(metrics.caption_scores({e.id: e.references for e in examples}, {e.id: preds[e.id] for e in examples}))
        out["exact match"] = sum(metrics.normalize_answer(preds[e.id]) == metrics.normalize_answer(e.target)
                                 for e in examples) / len(examples)
    else:
        out["accuracy"] = sum(metrics.vqa_accuracy(preds[e.id], e.references) if len(e.references) > 1 else
                              metrics.exact_match(preds[e.id], e.references[0]) for e in examples) / len(examples)
    if dataset == "toy":
        out.update(toy.attribute_accuracy(modality, [(e.meta, preds[e.id]) for e in examples]))
    return out


# ---- training ----
def train(model, tokenizer, train_ex, eval_ex, run_dir: Path, blind: bool) -> dict:
    """One run of the recipe (blind: the media blanked). Returns the held-out scores."""
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_tf = data.MediaTransform.for_encoder(modality, model.encoder)
    train_tf = data.MediaTransform.for_encoder(modality, model.encoder, train=augment and not cache_features)
    feats_train = feats_eval = None
    if cache_features:
        weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                         for f in hub.resolve(run_config()["encoder"]).iterdir() if f.is_file())
        key = f"{run_config()['encoder']}|{weights}|{eval_tf}|K={model.config.num_levels}|{dataset}"
        with autocast:
            feats_train = data.cached_features(model, train_ex, eval_tf, out_dir.parent / "cache", key + "|train",
                                               batch_size, device)
            feats_eval = data.cached_features(model, eval_ex, eval_tf, out_dir.parent / "cache", key + "|eval",
                                              batch_size, device)
        train_ex, feats_train = drop_undecodable(train_ex, feats_train, "train")
        eval_ex, feats_eval = drop_undecodable(eval_ex, feats_eval, "evaluation")
    optimizer = make_optimizer(model)
    it = load_state(model, optimizer, run_dir) if init_from == "resume" else 0
    fwd = torch.compile(model) if compile else model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[device] if device_type == "cuda" else None)
    stream = batches(train_ex, feats_train, tokenizer, train_tf, it * grad_accum, blind)
    log = (run_dir / "log.jsonl").open("a")
    pbar = tqdm(total=max_iters, initial=it, desc=f"training{' (blind control)' if blind else ''}",
                unit="it", disable=not master, dynamic_ncols=True)
    seen = dropped = 0
    t0, tokens, samples = time.time(), 0, 0
    while it < max_iters:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(it)
        total = 0.0
        for micro in range(grad_accum):
            batch = next(stream)
            seen, dropped = seen + len(batch["index"]) + batch["dropped"], dropped + batch["dropped"]
            if dropped > 0.01 * max(seen, 100):
                sys.exit(f"more than 1% of the training media failed to decode ({dropped} of {seen}): "
                         f"check --data_dir (each failure was named above)")
            media, feats = model_inputs(batch, cache_features)
            sync = nullcontext() if not ddp or micro == grad_accum - 1 else fwd.no_sync()
            with sync, autocast:
                _, loss = fwd(media, batch["ids"].to(device), batch["mask"].to(device),
                              batch["targets"].to(device), features=feats)
            if not torch.isfinite(loss):
                sys.exit(f"loss is {loss.item()} at iteration {it}: stopped. The last good checkpoint "
                         f"({run_dir / 'ckpt.safetensors'}) is kept; try a lower --lr")
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
            tokens, samples = tokens + int(batch["mask"].sum()), samples + len(batch["index"])
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        pbar.update(1)
        if it % log_interval == 0 or it == max_iters:  # rates over the last log_interval iterations
            dt = time.time() - t0
            row = {"iter": it, "loss": total, "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": samples * world / dt, "tokens_per_s": tokens * world / dt}
            if device_type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            pbar.set_postfix(loss=f"{total:.3f}", samples_s=f"{row['samples_per_s']:.1f}")
            if master:
                log.write(json.dumps(row) + "\n")
            t0, tokens, samples = time.time(), 0, 0
        if it % eval_interval == 0 or it == max_iters:
            model.eval()
            val = eval_loss(model, eval_ex, feats_eval, tokenizer, eval_tf, blind)
            model.train()
            if master:
                log.write(json.dumps({"iter": it, "val_loss": val}) + "\n")
                log.flush()
                save_checkpoint(model, optimizer, it, run_dir)
                plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
            pbar.write(f"iter {it}: train loss {total:.4f}, held-out loss {val:.4f}") if master else None
    pbar.close()
    log.close()
    return evaluate(model, tokenizer, eval_ex, feats_eval, eval_tf, run_dir, blind)


def drop_undecodable(examples, features, what):
    bad = torch.isnan(features).flatten(1).any(1)
    if bad.sum() > 0.01 * len(examples):
        sys.exit(f"more than 1% of the {what} media failed to decode ({int(bad.sum())} of {len(examples)})")
    keep = (~bad).nonzero().flatten().tolist()
    return [examples[i] for i in keep], features[~bad]


def evaluate(model, tokenizer, examples, features, transform, run_dir: Path, blind: bool) -> dict:
    """Generate for the held-out examples, score, and write predictions.jsonl and scores.json."""
    model.eval()
    n = eval_samples or len(examples)
    examples, features = examples[:n], None if features is None else features[:n]
    preds = predict(model, examples, features, tokenizer, transform, blind)
    scores = score(examples, preds)
    if master:
        with (run_dir / "predictions.jsonl").open("w") as f:
            for e in examples:
                if e.id in preds:
                    f.write(json.dumps({"id": e.id, "prompt": e.prompt, "prediction": preds[e.id],
                                        "references": e.references}) + "\n")
        (run_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def plot_curves(log_path: Path, png_path: Path, size=(640, 400)) -> None:
    """Training and held-out loss against iterations, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    series = {"train loss": [(r["iter"], r["loss"]) for r in rows if "loss" in r],
              "held-out loss": [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]}
    points = [p for s in series.values() for p in s]
    if len(points) < 2:
        return
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    (x0, y0), (x1, y1) = (50, 20), (size[0] - 20, size[1] - 40)
    xmax = max(p[0] for p in points)
    ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
    def xy(p):
        return (x0 + (x1 - x0) * p[0] / max(1, xmax), y1 - (y1 - y0) * (p[1] - ymin) / max(1e-9, ymax - ymin))
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for (name, pts), colour, ty in zip(series.items(), ("steelblue", "darkorange"), (y1 + 8, y1 + 22)):
        if len(pts) > 1:
            draw.line([xy(p) for p in pts], fill=colour, width=2)
        draw.text((x0, ty), f"{name} (last {pts[-1][1]:.3f})" if pts else name, fill=colour)
    draw.text((x1 - 120, y1 + 8), f"iterations 0..{xmax}", fill="black")
    draw.text((4, y0), f"{ymax:.2f}", fill="black")
    draw.text((4, y1 - 10), f"{ymin:.2f}", fill="black")
    img.save(png_path)


def results_table(scores: dict, blind: dict | None) -> str:
    """The held-out scores, next to the blind control's and, for the toy attributes, chance."""
    chance = toy.chance(modality) if dataset == "toy" else {}
    lines = [f"{'held-out':<24}{'eP-ALM':>10}" + (f"{'blind':>10}" if blind else "") + (f"{'chance':>10}" if chance else "")]
    for k, v in scores.items():
        pct = k not in ("CIDEr",) and not k.startswith("BLEU")
        fmt = (lambda x: f"{100 * x:9.1f}%") if pct else (lambda x: f"{x:10.3f}")
        row = f"{k:<24}{fmt(v)}" + (fmt(blind.get(k, float('nan'))) if blind else "")
        key = k.removesuffix(" accuracy")
        lines.append(row + (fmt(chance[key]) if key in chance else ""))
    return "\n".join(lines)


def main():
    if eval_only:
        path = out_dir / "ckpt.safetensors"
        if not path.exists():
            sys.exit(f"--eval_only: no checkpoint at {path} (train first, or pass --out_dir)")
        model, tokenizer, cfg = from_checkpoint(path, dtype=ptdtype if device_type == "cuda" else torch.float32)
        model.to(device)
        global modality, task, dataset  # the checkpoint knows what it was trained on
        modality, task, dataset = cfg["modality"], cfg["task"], cfg["dataset"]
        _, eval_ex = load_examples(train_split=False)
        eval_tf = data.MediaTransform.for_encoder(modality, model.encoder)
        scores = evaluate(model, tokenizer, eval_ex, None, eval_tf, out_dir, blind=False)
        say(results_table(scores, None))
        say(f"predictions and scores written to {out_dir}")
        return
    model, tokenizer = build_model()
    say(f"eP-ALM on {modality} {task}: {model.parameter_report()}; injected into LM layers "
        f"[{model.start}, {model.end}) of {len(model.lm.layers)}")
    train_ex, eval_ex = load_examples()
    say(f"{len(train_ex):,} training and {len(eval_ex):,} held-out examples")
    scores = train(model, tokenizer, train_ex, eval_ex, out_dir, blind=False)
    blind = None
    if blind_control:
        torch.manual_seed(seed)  # the same recipe, a fresh adapter, the media blanked
        control = EPALM(model.lm, model.encoder, epalm_config()).to(device)
        blind = train(control, tokenizer, train_ex, eval_ex, out_dir / "blind", blind=True)
    if master:
        table = results_table(scores, blind)
        print(table)
        (out_dir / "results.json").write_text(json.dumps({"scores": scores, "blind": blind,
                                                          "config": settings}, indent=1, default=str))
        print(f"checkpoint, log, curves and predictions in {out_dir}/; try: python sample.py --{modality} FILE")
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
