"""Train eP-ALM: a frozen LM and a frozen encoder, with a linear connector and a soft prompt trained on top.

    python train.py --modality audio                      # the miniature world (toy.py), minutes on a CPU
    python train.py --modality=image --task=vqa           # ... answering questions instead of captioning
    python train.py --modality=image --dataset=coco --data_dir=/data/coco \\
        --lm=facebook/opt-2.7b --encoder=google/vit-base-patch16-224   # the real thing (a GPU)
    torchrun --nproc_per_node=8 train.py ...              # several GPUs (DDP over the adaptation parameters)
    python train.py --eval_only --out_dir=out/image-caption   # score a checkpoint, write its predictions

Configuration is nanoGPT's: the defaults below, then the toy world's preset (when dataset is toy), then
JSON files given as bare arguments, then flags (`--key value` or `--key=value`; see configurator.py).
`python train.py --help` lists every setting.
"""
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

import configurator
import data
import benchmarks
import hub
import metrics
import toy
from media import MediaError
from model import EPALM, EPALMConfig, from_checkpoint, load_backbones

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
eval_samples = 0            # held-out items generated and scored at the end and by --eval_only; 0 = the whole split
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
fsdp = False                # shard the frozen LM and encoder over the processes (FSDP2) instead of replicating them


# ---- the command line: --key value / --key=value flags and JSON files over the defaults above ----
settings = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
chosen = configurator.overrides(sys.argv[1:], settings, __doc__)
if chosen.get("eval_only"):  # a checkpoint knows what it was trained on: score it on that
    ckpt = Path(chosen.get("out_dir") or f"out/{chosen.get('modality', modality)}-{chosen.get('task', task)}",
                "ckpt.safetensors")
    if not ckpt.exists():
        configurator.fail(f"--eval_only: no checkpoint at {ckpt} (train first, or pass --out_dir)")
    try:
        _, trained = hub.load_adapter(ckpt)
    except ValueError as e:
        configurator.fail(f"--eval_only: {e}")
    chosen.update(out_dir=str(ckpt.parent), **{k: trained[k] for k in ("modality", "task", "dataset")})
    chosen.setdefault("data_dir", trained.get("data_dir", ""))  # where it was trained, unless told otherwise
for k, allowed in [("modality", data.MODALITIES), ("task", ("caption", "vqa")), ("inject", ("late", "input")),
                   ("init_from", ("scratch", "resume")), ("dataset", ("toy", *benchmarks.DATASETS)),
                   ("dtype", ("float32", "bfloat16", "float16"))]:
    if chosen.get(k, settings[k]) not in allowed:
        configurator.fail(f"--{k} {chosen[k]}: expected one of {', '.join(allowed)}")
if chosen.get("dataset", dataset) == "toy":  # the miniature world's preset, under what the user chose
    preset = toy.train_preset(chosen.get("modality", modality), chosen.get("task", task))
    if chosen.get("fsdp"):  # a second adapter around the same sharded backbones is not something FSDP allows
        preset["blind_control"] = False
    chosen = {**preset, **chosen}
elif "task" not in chosen:
    chosen["task"] = benchmarks.DATASETS[chosen["dataset"]].task
if chosen.get("fsdp") and chosen.get("blind_control"):
    configurator.fail("--blind_control needs a second adapter around the same backbones, which FSDP cannot shard "
                      "twice: run the control without --fsdp")
settings.update(chosen)
globals().update(settings)
out_dir = Path(out_dir or f"out/{modality}-{task}")

# ---- setup: devices, precision, distributed ----
# Under torchrun every process trains on its own batches. DDP (the default) replicates the frozen backbones and
# all-reduces the adapter's gradients; FSDP shards the frozen backbones so that an LM larger than one GPU fits.
# Evaluation and feature caching split their batches over the processes in both cases.
distributed = "RANK" in os.environ
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
backend = "nccl" if device.startswith("cuda") else "gloo"
if distributed:
    torch.distributed.init_process_group(backend)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
elif fsdp:  # one process (e.g. to see the mechanics on one GPU): a process group of one
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
ddp = distributed and not fsdp
master = rank == 0
ptdtype = getattr(torch, dtype)
device_type = "cuda" if device.startswith("cuda") else "cpu"
weights_dtype = ptdtype if device_type == "cuda" else torch.float32  # the frozen backbones' storage
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
            "data_dir": str(Path(data_dir).resolve()) if data_dir else "",
            "lm": lm or str(toy.TOY_DIR / "lm"), "encoder": encoder or str(toy.encoder_dir(modality)),
            "epalm": epalm_config().__dict__}


# ---- data ----
def load_examples(train_split: bool = True):
    if dataset == "toy":
        return (data.toy_examples(modality, task, "train", toy_train_samples, seed) if train_split else [],
                data.toy_examples(modality, task, "heldout", toy_eval_samples, seed + 1))
    return (benchmarks.read_dataset(dataset, data_dir, "train") if train_split else [],
            benchmarks.read_dataset(dataset, data_dir, eval_split))


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
    lm_, tokenizer, encoder_ = load_backbones(modality, cfg["lm"], cfg["encoder"], dtype=weights_dtype,
                                              shard=shard_blocks if fsdp else None)
    torch.manual_seed(seed)
    model = EPALM(lm_, encoder_, epalm_config()).to(device)
    return (shard_root(model) if fsdp else model), tokenizer


# ---- FSDP2: the frozen backbones sharded over the processes ----
def shard_blocks(backbone):
    """One FSDP unit per LM layer / encoder block, applied on the meta device before any weight is read: each
    process then reads only its own rows of every layer from the checkpoint files (hub.load_weights), so no
    process ever holds a whole layer stack. Bf16 weights on a GPU need no MixedPrecisionPolicy: they are stored
    in bf16 and frozen, so there is no fp32 master copy and no gradient to reduce."""
    from torch.distributed.fsdp import fully_shard
    for block in backbone.layers:
        fully_shard(block)


def shard_root(model):
    """The root unit: the frozen weights outside the blocks (token and position embeddings, final norms, the
    encoder's stem), loaded whole and sharded here. The adapter (connector + prompt, a few MB) is left out of
    FSDP on purpose: replicated on every process, its gradients averaged by one all_reduce per step (what DDP
    does), so checkpoints, the optimizer state and exact resume stay plain tensors. Generation and encoding are
    entry points besides forward: registered, so that the root's weights are gathered for them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    fully_shard(model, ignored_params=set(model.trainable_parameters()))
    for method in ("generate", "encode"):
        register_fsdp_forward_method(model, method)
    return model


def frozen_bytes(model) -> tuple[int, int]:
    """Bytes of the frozen weights this process holds, and of the whole model's frozen weights."""
    mine = whole = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            mine, whole = mine + local.numel() * local.element_size(), whole + p.numel() * p.element_size()
    return mine, whole


def average_adapter_gradients(model):
    """What DDP does for the adapter under FSDP: every process ends the step with the mean gradient."""
    for p in model.trainable_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


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
    hub.save_adapter(model, run_dir / "ckpt.safetensors", {**run_config(), "iter": it})


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


def my_batches(num_batches: int) -> list[int]:
    """This process's share of an evaluation's batches: every world-th one from its rank on. The batches are
    those of a one-process run, so each process's results are bit-identical to that run's. Under FSDP every
    process must take part in every forward, so those with one batch fewer end with a repeat (None)."""
    mine = list(range(rank, num_batches, world))
    if fsdp:
        mine += [None] * (-(-num_batches // world) - len(mine))
    return mine


def eval_batch(collate, examples, features, transform, k: int | None):
    """(batch k of an evaluation, whether it is batch k). Undecodable media are skipped, each with a warning. Under
    FSDP every process must take part in every forward: for a repeat (k None), or a batch with nothing that
    decodes, it runs on the first batch that does, and its results are dropped."""
    starts = [] if k is None else [k * batch_size]
    for start in starts + (list(range(0, len(examples), batch_size)) if fsdp else []):
        items = []
        for i in range(start, min(start + batch_size, len(examples))):
            try:
                items.append((i, features[i] if features is not None else transform(examples[i].media)))
            except MediaError as e:
                if starts and start == starts[0]:
                    print(f"warning: skipped {e}", file=sys.stderr)
        batch = collate(items)
        if batch["index"] or not fsdp:
            return batch, bool(starts) and start == starts[0]
    return batch, False


def all_ranks_done(done: bool) -> bool:
    """Under FSDP a process whose rows have all finished keeps decoding (its outputs ignored) until every
    process has finished, so that all of them run the same forwards."""
    flag = torch.tensor([float(not done)], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def gather_to_master(part: dict) -> dict:
    """Merge every process's dict on rank 0 (the other ranks get {})."""
    if world == 1:
        return part
    parts = [None] * world if master else None
    torch.distributed.gather_object(part, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if master else {}


@torch.no_grad()
def eval_loss(model, examples, features, tokenizer, transform, blind, max_batches=10) -> float:
    """Mean loss over the held-out items of the first max_batches batches (a subset: this runs during training),
    each process taking its share of the batches."""
    collate = data.Collate(examples, tokenizer, blind=blind)
    total = torch.zeros(2, device=device)  # sum of per-item losses, number of items
    for k in my_batches(min(max_batches, -(-len(examples) // batch_size))):
        batch, own = eval_batch(collate, examples, features, transform, k)
        if not batch["index"]:
            continue
        media, feats = model_inputs(batch, features is not None)
        with autocast:
            _, loss = model(media, batch["ids"].to(device), batch["mask"].to(device), batch["targets"].to(device),
                            features=feats)
        if own:
            n = len(batch["index"])
            total += torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device)])
    if world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


@torch.no_grad()
def predict(model, examples, features, tokenizer, transform, blind, desc="generating") -> dict[str, str]:
    """Generated text per example id, on rank 0 (undecodable media are left out). Each process generates for
    its share of the batches; rank 0 gathers them."""
    collate, preds = data.Collate(examples, tokenizer, blind=blind, with_target=False), {}
    for k in tqdm(my_batches(-(-len(examples) // batch_size)), desc=desc, unit="batch", leave=False,
                  disable=not master):
        batch, own = eval_batch(collate, examples, features, transform, k)
        if not batch["index"]:
            continue
        media, feats = model_inputs(batch, features is not None)
        with autocast:
            out = model.generate(media, batch["ids"].to(device), batch["mask"].to(device), features=feats,
                                 max_new_tokens=max_new_tokens, num_beams=num_beams,
                                 compile=compile and not fsdp,  # FSDP's hooks run collectives: no CUDA graphs
                                 all_done=all_ranks_done if fsdp else None)
        if own:
            for i, tokens in zip(batch["index"], out):
                preds[examples[i].id] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return gather_to_master(preds)


def score(examples, preds: dict[str, str]) -> dict[str, float]:
    """The paper's metrics (CIDEr / BLEU for captions, VQA accuracy or exact match for answers), exact match,
    and in the toy world the accuracy per attribute."""
    examples = [e for e in examples if e.id in preds]
    if not examples:
        return {}
    out = {"items": len(examples)}
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
                                               batch_size, device, rank, world, lockstep=fsdp)
            feats_eval = data.cached_features(model, eval_ex, eval_tf, out_dir.parent / "cache", key + "|eval",
                                              batch_size, device, rank, world, lockstep=fsdp)
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
    # The losses stay on the device until a log line or a checkpoint needs them: a .item() per micro-step would
    # make the CPU wait for the GPU once per micro-batch (nanoGPT syncs only at log intervals for this reason).
    # A NaN or inf in any step makes the interval's sum non-finite, so the check below still catches it, before
    # any checkpoint is written from the damaged weights.
    interval_loss, interval_start = torch.zeros((), device=device), it
    while it < max_iters:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(it)
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
            (loss / grad_accum).backward()
            interval_loss += loss.detach() / grad_accum
            tokens, samples = tokens + int(batch["mask"].sum()), samples + len(batch["index"])
        if fsdp and world > 1:
            average_adapter_gradients(model)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        pbar.update(1)
        evaluate_now = it % eval_interval == 0 or it == max_iters
        if not (it % log_interval == 0 or evaluate_now):
            continue
        if world > 1:
            torch.distributed.all_reduce(interval_loss)
        train_loss = interval_loss.item() / (it - interval_start) / world  # the one host sync of the interval
        if not math.isfinite(train_loss):
            sys.exit(f"loss is {train_loss} between iterations {interval_start + 1} and {it}: stopped. The last good "
                     f"checkpoint ({run_dir / 'ckpt.safetensors'}) is kept; try a lower --lr")
        dt = time.time() - t0  # rates over the iterations since the last log line
        row = {"iter": it, "loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               "samples_per_s": samples * world / dt, "tokens_per_s": tokens * world / dt}
        if device_type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        pbar.set_postfix(loss=f"{train_loss:.3f}", samples_s=f"{row['samples_per_s']:.1f}")
        if master:
            log.write(json.dumps(row) + "\n")
        t0, tokens, samples = time.time(), 0, 0
        interval_loss.zero_()
        interval_start = it
        if evaluate_now:
            model.eval()
            val = eval_loss(model, eval_ex, feats_eval, tokenizer, eval_tf, blind)
            model.train()
            if master:
                log.write(json.dumps({"iter": it, "val_loss": val}) + "\n")
                log.flush()
                save_checkpoint(model, optimizer, it, run_dir)
                plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
                pbar.write(f"iter {it}: train loss {train_loss:.4f}, held-out loss {val:.4f}")
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
    """Generate for the held-out examples (all of them, or eval_samples), score, and write predictions.jsonl
    and scores.json on rank 0. The scores say on how many items they were computed ("items")."""
    model.eval()
    n = eval_samples or len(examples)
    examples, features = examples[:n], None if features is None else features[:n]
    t0 = time.time()
    preds = predict(model, examples, features, tokenizer, transform, blind)
    say(f"generated for {len(preds):,} held-out items in {time.time() - t0:.1f} s ({world} process(es))")
    scores = score(examples, preds) if master else {}
    if master:
        with (run_dir / "predictions.jsonl").open("w") as f:
            for e in examples:
                if e.id in preds:
                    f.write(json.dumps({"id": e.id, "prompt": e.prompt, "prediction": preds[e.id],
                                        "references": e.references}) + "\n")
        (run_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def nice_ticks(low: float, high: float, log: bool) -> list[float]:
    """Round axis values between low and high: 1-2-5 steps (log: 1, 2, 5 x 10^k, or every digit when the range
    is less than a decade)."""
    if log:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
            ticks = [m * 10.0 ** d for d in decades for m in mantissas if low <= m * 10.0 ** d <= high]
            if len(ticks) >= 3:
                return ticks
        return ticks or [low, high]
    raw = (high - low) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def plot_curves(log_path: Path, png_path: Path, size=(720, 440)) -> None:
    """Training loss (line) and held-out loss (markers) against iterations on a log-scale loss axis, drawn with
    Pillow (no plotting dependency). Log scale because the loss falls by orders of magnitude early on."""
    from PIL import Image, ImageDraw
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_pts = [(r["iter"], r["loss"]) for r in rows if "loss" in r and r["loss"] > 0]
    val_pts = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r and r["val_loss"] > 0]
    points = train_pts + val_pts
    if len(points) < 2:
        return
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    (x0, y0), (x1, y1) = (70, 20), (size[0] - 20, size[1] - 60)
    xmax = max(1, max(p[0] for p in points))
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    low, high = (low / 1.5, high * 1.5) if high / low < 1.5 else (low / 1.1, high * 1.1)
    def xy(p):
        y = (math.log(p[1]) - math.log(low)) / (math.log(high) - math.log(low))
        return x0 + (x1 - x0) * p[0] / xmax, y1 - (y1 - y0) * y
    for v in nice_ticks(low, high, log=True):  # horizontal grid lines with their loss values
        y = xy((0, v))[1]
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 8, y), f"{v:g}", fill="black", anchor="rm")
    for v in nice_ticks(0, xmax, log=False):
        x = xy((v, low))[0]
        draw.line((x, y0, x, y1), fill=(235, 235, 235))
        draw.text((x, y1 + 6), f"{v:g}", fill="black", anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    if len(train_pts) > 1:
        draw.line([xy(p) for p in train_pts], fill="steelblue", width=2)
    for p in val_pts:
        x, y = xy(p)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill="darkorange", outline="black")
    draw.text(((x0 + x1) / 2, y1 + 24), "iterations", fill="black", anchor="mt")
    draw.text((8, y0 - 14), "loss (log scale)", fill="black")
    legend = [("train loss", "steelblue", train_pts), ("held-out loss", "darkorange", val_pts)]
    for k, (name, colour, pts) in enumerate(legend):
        draw.text((x0 + 10 + 230 * k, y1 + 40), f"{name} (last {pts[-1][1]:.4g})" if pts else name, fill=colour)
    img.save(png_path)


def results_table(scores: dict, blind: dict | None) -> str:
    """The held-out scores, next to the blind control's and, for the toy attributes, chance; the header says on
    how many items each column was computed."""
    chance = toy.chance(modality) if dataset == "toy" else {}
    split = "heldout" if dataset == "toy" else eval_split
    lines = [f"{'held-out, ' + split + ' split':<28}" + f"{'eP-ALM':>10}" + (f"{'blind':>10}" if blind else "") +
             (f"{'chance':>10}" if chance else ""),
             f"{'items scored':<28}" + f"{scores.get('items', 0):>10,}" +
             (f"{blind.get('items', 0):>10,}" if blind else "")]
    for k, v in scores.items():
        if k == "items":
            continue
        pct = k not in ("CIDEr",) and not k.startswith("BLEU")
        fmt = (lambda x: f"{100 * x:9.1f}%") if pct else (lambda x: f"{x:10.3f}")
        row = f"{k:<28}{fmt(v)}" + (fmt(blind.get(k, float('nan'))) if blind else "")
        key = k.removesuffix(" accuracy")
        lines.append(row + (fmt(chance[key]) if key in chance else ""))
    return "\n".join(lines)


def main():
    if eval_only:
        run_eval_only()
    else:
        run_training()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 may still be scoring and writing: leave together
        torch.distributed.destroy_process_group()


def run_eval_only():
    """Score the checkpoint in out_dir (its modality, task and data set were read with the settings)."""
    model, tokenizer, _ = from_checkpoint(out_dir / "ckpt.safetensors", dtype=weights_dtype,
                                          shard=shard_blocks if fsdp else None)
    model.to(device)
    model = shard_root(model) if fsdp else model
    _, eval_ex = load_examples(train_split=False)
    eval_tf = data.MediaTransform.for_encoder(modality, model.encoder)
    scores = evaluate(model, tokenizer, eval_ex, None, eval_tf, out_dir, blind=False)
    say(results_table(scores, None))
    say(f"predictions and scores written to {out_dir}")


def run_training():
    """Train the recipe (and its blind control), score it, and print the results table."""
    model, tokenizer = build_model()
    say(f"eP-ALM on {modality} {task}: {model.parameter_report()}; injected into LM layers "
        f"[{model.start}, {model.end}) of {len(model.lm.layers)}")
    if fsdp:
        mine, whole = frozen_bytes(model)
        say(f"FSDP over {world} process(es): frozen weights {mine / 2**20:,.1f} MiB on this process, "
            f"{whole / 2**20:,.1f} MiB in all")
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


if __name__ == "__main__":
    main()
