"""Train eP-ALM: a frozen LM and a frozen encoder, with a linear connector and a soft prompt trained on top.

    python train.py --modality audio                      # the miniature world (toy.py), minutes on a CPU
    python train.py --modality=image --task=vqa           # ... answering questions instead of captioning
    python train.py --modality=image --dataset=coco --data_dir=/data/coco \\
        --lm=facebook/opt-2.7b --encoder=google/vit-base-patch16-224   # the real thing (a GPU)
    torchrun --nproc_per_node=8 train.py ...              # several GPUs (distributed.py: DDP or FSDP)
    python train.py --eval_only --out_dir=out/image-caption   # score a checkpoint, write its predictions

Configuration is nanoGPT's: the defaults below, then the toy world's preset (when dataset is toy), then
JSON files given as bare arguments, then flags (`--key value` or `--key=value`; see configurator.py).
`python train.py --help` lists every setting. Evaluation is evaluate.py; the curves are drawn by plot.py.
"""
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import benchmarks
import checkpoint
import configurator
import data
import distributed
import hub
import toy
import train_config
from evaluate import EvalConfig, eval_batches, evaluate, results_table
from model import EPALM, EPALMConfig, load_backbones
from plot import plot_curves

# ---- configuration ----
modality = "image"          # image | audio | video
task = "caption"            # caption | vqa
dataset = "toy"             # toy | coco | vqav2 | gqa | audiocaps | msrvtt | msrvtt_qa | msvd_qa
data_dir = ""               # the data set's root folder (not for toy)
lm = ""                     # "" = the toy LM, or for a real data set the paper's OPT-2.7B; else a hub id or folder
encoder = ""                # "" = the modality's toy encoder, or for a real data set the paper's (train_config.py)
out_dir = ""                # "" = out/{modality}-{task}
init_from = "scratch"       # scratch | resume
eval_only = False
# eP-ALM (model.py): the pt-L recipe by default
num_levels = 6
inject_start: int | None = None  # None: OPT-2.7B's window 19..31 of 32 scaled to the LM's depth
inject_end: int | None = None
inject = "late"             # late | input (ablation: the last level's token only, as a prefix at layer 0)
shared_connector = True
prompt_length = 10
prompt_mlp = False
media_tokens: int | None = None  # tokens per level; None: the LM's query heads per key-value head (1 for OPT)
# optimisation
max_iters = 20000
batch_size = 16
grad_accum = 1
lr = 2e-4                   # connector
prompt_lr = 1e-3
weight_decay = 0.02
warmup_iters = 1000
lr_decay_iters: int | None = None  # None = max_iters (set it to stop early and resume on the same schedule)
min_lr_ratio = 0.1
grad_clip = 1.0
augment = True              # train-time augmentation (image crop/flip, SpecAugment, frame offsets)
cache_features = False      # encode each media file once and train on the stored [CLS] tokens (no augment)
num_workers = min(4, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                  // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # no more loader processes than cores per process
# evaluation and logging
eval_interval = 1000
eval_iters = 10             # held-out batches whose loss is logged at each evaluation
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
# bf16 matmuls are ~500x slower than fp32 on CPUs without bf16 instructions: fp32 there
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()
fsdp = False                # shard the frozen LM and encoder over the processes (FSDP2) instead of replicating them
quantize = "none"           # none | int8 | int4: the frozen LM's linear layers in weight-only 8 or 4 bits (quantize.py)
quantize_group_size = 128   # int4: how many inputs of a row share a scale and a zero (32, 64 or 128)
quantize_encoder = False    # the encoder's linear layers too, as --quantize says
debug = False               # show the traceback of errors (EPALM_DEBUG=1 too), not only their one line


# ---- the command line: --key value / --key=value flags and JSON files over the defaults above ----
DEFAULTS = {k: v for k, v in globals().items()  # taken before the setup below adds globals of its own
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
TYPES = configurator.annotated_types(globals())  # of the settings whose default is None


def configure(argv: list[str]) -> dict:
    """The settings of a run (train_config.py: the toy preset or a data set's own, a checkpoint's, the checks)."""
    return train_config.resolve(argv, DEFAULTS, TYPES, __doc__)


settings = configure(sys.argv[1:] if __name__ == "__main__" else [])
globals().update(settings)
out_dir = Path(out_dir or f"out/{modality}-{task}")

# ---- setup: devices, precision, processes (distributed.py says what each process holds) ----
rank, world, device = distributed.setup(device, fsdp)
ddp = world > 1 and not fsdp
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
                           prompt_length=prompt_length, prompt_mlp=prompt_mlp, media_tokens=media_tokens)
    return EPALMConfig(num_levels=num_levels, inject_start=inject_start, inject_end=inject_end,
                       shared_connector=shared_connector, prompt_length=prompt_length, prompt_mlp=prompt_mlp,
                       media_tokens=media_tokens)


def run_config() -> dict:
    """What a checkpoint must remember to be used again (sample.py, --eval_only, --init_from=resume)."""
    return {"modality": modality, "task": task, "dataset": dataset,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else "",
            # the toy backbones by their place in the clone, so that a run folder loads in any clone (hub.py)
            "lm": lm or "toy/lm", "encoder": encoder or f"toy/{toy.encoder_dir(modality).name}",
            **{k: globals()[k] for k in ("num_beams", "max_new_tokens", "seed", "toy_eval_samples")},
            **quantization(), "epalm": epalm_config().__dict__}


def quantization() -> dict:
    """How the frozen backbones are quantized, as run_config records it (quantize: None, int8 or int4) and
    checkpoint.load_model reads it back."""
    return {"quantize": None if quantize == "none" else quantize, "quantize_group_size": quantize_group_size,
            "quantize_encoder": quantize_encoder}


def eval_config() -> EvalConfig:
    return EvalConfig(task, dataset, modality, batch_size, num_workers, num_beams, max_new_tokens, eval_samples,
                      device, autocast, compile, fsdp)


# ---- data ----
def load_examples(train_split: bool = True):
    if dataset == "toy":
        return (data.toy_examples(modality, task, "train", toy_train_samples, seed) if train_split else [],
                data.toy_examples(modality, task, "heldout", toy_eval_samples, seed + 1))
    return (benchmarks.read_dataset(dataset, data_dir, "train", modality) if train_split else [],
            benchmarks.read_dataset(dataset, data_dir, eval_split, modality))  # errors: one line (configurator.run)


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def micro_batches(n: int, first_step: int):
    """The (example index, epoch) pairs of each micro-step from `first_step` on: shuffled epochs, a pure function
    of (seed, step), so a resumed run sees exactly the batches (and, through the epoch, the augmentations) the
    uninterrupted run would have seen."""
    step = first_step
    while True:
        start, out = (step * world + rank) * batch_size, []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            out += [(i, epoch) for i in epoch_order(n, epoch)[offset:offset + batch_size - len(out)]]
        yield out
        step += 1


def batches(examples, features, tokenizer, transform, first_step: int, blind: bool):
    """Training batches from micro-step `first_step` on (see data.Collate for what a batch holds)."""
    loader = torch.utils.data.DataLoader(
        data.ExampleDataset(examples, transform, features, seed),
        batch_sampler=micro_batches(len(examples), first_step), pin_memory=device_type == "cuda",
        num_workers=0 if features is not None else num_workers,
        collate_fn=data.Collate(examples, tokenizer, blind=blind))
    return iter(loader)


# ---- model, optimiser, schedule, checkpoints ----
def build_model():
    cfg = run_config()
    lm_, tokenizer, encoder_ = load_backbones(modality, cfg["lm"], cfg["encoder"], dtype=weights_dtype,
                                              shard=distributed.shard_blocks if fsdp else None,
                                              quantize=cfg["quantize"], group_size=quantize_group_size,
                                              quantize_encoder=quantize_encoder)
    if inject == "late" and num_levels > len(encoder_.layers):
        configurator.fail(f"--num_levels {num_levels}: more levels than the {len(encoder_.layers)} blocks of "
                          f"the encoder")
    torch.manual_seed(seed)
    model = EPALM(lm_, encoder_, epalm_config()).to(device)
    return (distributed.shard_root(model) if fsdp else model), tokenizer


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


def save_checkpoint(model, optimizer, scaler, it: int, run_dir: Path, scores=None, blind=None) -> None:
    """state.pt, ckpt.safetensors and the model card (checkpoint.py); with the scores, the run's final card."""
    checkpoint.save(run_dir, model, optimizer, scaler, {**run_config(), "iter": it}, sys.argv[1:],
                    "heldout" if dataset == "toy" else eval_split, scores, blind)


# ---- training ----
@torch.no_grad()
def eval_loss(model, examples, features, tokenizer, transform, blind) -> float:
    """Mean loss over the held-out items of the first eval_iters batches (a subset: this runs during training),
    each process taking its share of the batches."""
    total = torch.zeros(2, device=device)  # sum of per-item losses, number of items
    for batch, own in eval_batches(examples, features, tokenizer, transform, eval_config(), blind,
                                   max_batches=eval_iters):
        if not batch["index"]:
            continue
        media, feats = data.model_inputs(batch, device, cached=features is not None)
        with autocast:
            _, loss = model(media, batch["ids"].to(device), batch["mask"].to(device), batch["targets"].to(device),
                            features=feats)
        if own:
            n = len(batch["index"])
            total += torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device)])
    distributed.sum_over_processes(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def cached_features(model, train_ex, eval_ex, transform):
    """The encoder's [CLS] tokens of every training and held-out item, computed once (data.cached_features,
    shared over the processes); the items whose media failed to decode are dropped."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                     for f in hub.resolve(run_config()["encoder"]).iterdir() if f.is_file())
    key = f"{run_config()['encoder']}|{weights}|{transform}|K={model.config.num_levels}|{dataset}"
    if quantize_encoder:  # other features than the full-precision encoder's
        key += f"|{quantize}-{quantize_group_size}"
    out = []
    for examples, split in ((train_ex, "train"), (eval_ex, "eval")):
        with autocast:
            feats = data.cached_features(model, examples, transform, out_dir.parent / "cache", f"{key}|{split}",
                                         batch_size, device, rank, world, lockstep=fsdp)
        bad = torch.isnan(feats).flatten(1).any(1)
        data.check_failures(int(bad.sum()), len(examples), f"{split} media")
        out += [[examples[i] for i in (~bad).nonzero().flatten().tolist()], feats[~bad]]
    return out


def train(model, tokenizer, train_ex, eval_ex, run_dir: Path, blind: bool, resume: bool) -> dict:
    """One run of the recipe (blind: the media blanked), from scratch or resumed from run_dir/state.pt.
    Returns the held-out scores."""
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_tf = data.MediaTransform.for_encoder(modality, model.encoder)
    train_tf = data.MediaTransform.for_encoder(modality, model.encoder, train=augment and not cache_features)
    feats_train = feats_eval = None
    if cache_features:
        train_ex, feats_train, eval_ex, feats_eval = cached_features(model, train_ex, eval_ex, eval_tf)
    optimizer = make_optimizer(model)
    # float16 (GPUs without bf16) needs its loss scaled so that small gradients do not underflow to zero
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    it = checkpoint.load(run_dir, model, optimizer, scaler) if resume else 0
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
            data.check_failures(dropped, seen, "training media")
            media, feats = data.model_inputs(batch, device, cached=cache_features)
            sync = nullcontext() if not ddp or micro == grad_accum - 1 else fwd.no_sync()
            with sync, autocast:
                _, loss = fwd(media, batch["ids"].to(device), batch["mask"].to(device),
                              batch["targets"].to(device), features=feats)
            scaler.scale(loss / grad_accum).backward()
            interval_loss += loss.detach() / grad_accum
            tokens, samples = tokens + int(batch["mask"].sum()), samples + len(batch["index"])
        if fsdp and world > 1:
            distributed.average_adapter_gradients(model)
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        pbar.update(1)
        stop = distributed.max_over_processes(stop_signal, device)  # every process stops after the same step
        if stop:
            if master:
                save_checkpoint(model, optimizer, scaler, it, run_dir)
            say(f"stopped by {signal.Signals(stop).name} after iteration {it}: checkpoint written to {run_dir}/. "
                f"Continue with the same command and --init_from resume (exit status {128 + stop})")
            distributed.finish()
            sys.exit(128 + stop)
        evaluate_now = it % eval_interval == 0 or it == max_iters
        if not (it % log_interval == 0 or evaluate_now):
            continue
        train_loss = distributed.sum_over_processes(interval_loss).item() / (it - interval_start) / world
        if not math.isfinite(train_loss):  # the one host sync of the interval, above
            configurator.fail(f"loss is {train_loss} between iterations {interval_start + 1} and {it}: stopped. The "
                              f"last good checkpoint ({run_dir / 'ckpt.safetensors'}) is kept; try a lower --lr")
        dt = time.time() - t0  # rates over the iterations since the last log line
        row = {"iter": it, "loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               "samples_per_s": samples * world / dt, "tokens_per_s": tokens * world / dt}
        if device_type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        pbar.set_postfix(loss=f"{train_loss:.3f}", samples_s=f"{row['samples_per_s']:.1f}")
        if master:
            log.write(json.dumps(row) + "\n")
            log.flush()
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
                save_checkpoint(model, optimizer, scaler, it, run_dir)
                plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
                pbar.write(f"iter {it}: train loss {train_loss:.4f}, held-out loss {val:.4f}")
    pbar.close()
    log.close()
    return evaluate(model, tokenizer, eval_ex, feats_eval, eval_tf, run_dir, eval_config(), blind)


def scores_table(scores: dict, blind: dict | None = None) -> str:
    return results_table(scores, blind, "heldout" if dataset == "toy" else eval_split,
                         toy.chance(modality) if dataset == "toy" else None)


# ---- preemption: a scheduler's SIGTERM (or SLURM's --signal=USR1@...) costs at most the current step ----
stop_signal = 0


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum  # the loop checks after each optimizer step, then checkpoints and exits 128 + signum


def main():
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, request_stop)
    if eval_only:
        run_eval_only()
    else:
        run_training()
    distributed.finish()


def run_eval_only():
    """Score the checkpoint in out_dir (its modality, task and data set were read with the settings)."""
    model, tokenizer, _ = checkpoint.load_model(out_dir / "ckpt.safetensors", dtype=weights_dtype,
                                                shard=distributed.shard_blocks if fsdp else None,
                                                quantization=quantization())
    model.to(device)
    model = distributed.shard_root(model) if fsdp else model
    _, eval_ex = load_examples(train_split=False)
    eval_tf = data.MediaTransform.for_encoder(modality, model.encoder)
    scores = evaluate(model, tokenizer, eval_ex, None, eval_tf, out_dir, eval_config())
    say(scores_table(scores))
    say(f"predictions and scores written to {out_dir}")


def run_training():
    """Train the recipe (and its blind control), score it, and print the results table."""
    if init_from == "resume":
        checkpoint.check_resume(out_dir, quantization())
    train_ex, eval_ex = load_examples()  # before the backbones: a data set's errors come at once
    say(f"{len(train_ex):,} training and {len(eval_ex):,} held-out examples")
    model, tokenizer = build_model()
    say(f"eP-ALM on {modality} {task}: {model.parameter_report()}; injected into LM layers "
        f"[{model.start}, {model.end}) of {len(model.lm.layers)}")
    if fsdp:
        mine, whole = distributed.frozen_bytes(model)
        say(f"FSDP over {world} process(es): frozen weights {mine / 2**20:,.1f} MiB on this process, "
            f"{whole / 2**20:,.1f} MiB in all")
    scores = train(model, tokenizer, train_ex, eval_ex, out_dir, blind=False, resume=init_from == "resume")
    blind = None
    if blind_control:
        torch.manual_seed(seed)  # the same recipe, a fresh adapter, the media blanked
        control = EPALM(model.lm, model.encoder, epalm_config()).to(device)
        blind = train(control, tokenizer, train_ex, eval_ex, out_dir / "blind", blind=True,  # not started yet?
                      resume=init_from == "resume" and (out_dir / "blind" / "state.pt").exists())
    if master:
        print(scores_table(scores, blind))
        (out_dir / "results.json").write_text(json.dumps({"scores": scores, "blind": blind,
                                                          "config": settings}, indent=1, default=str))
        save_checkpoint(model, None, None, max_iters, out_dir, scores, blind)  # the card, with the scores
        where = "" if out_dir == Path(f"out/{modality}-{task}") else f" --checkpoint {out_dir}"
        print(f"checkpoint, log, curves and predictions in {out_dir}/; try: python sample.py --{modality} FILE"
              + where + (' --question "..."' if task == "vqa" else ""))


if __name__ == "__main__":
    configurator.run(main, debug)
