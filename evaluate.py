"""Held-out evaluation: generate for the held-out items, score them with the paper's metrics, write
predictions.jsonl and scores.json, and the results table. train.py runs it after training and for --eval_only.

Batches take training's path (data.ExampleDataset -> data.Collate in a DataLoader, so loader workers decode
ahead), with a batch sampler over this process's share of the batches (distributed.my_batches): the batches
of a one-process run, so several processes give bit-identical predictions, gathered on rank 0.

References: the official eP-ALM evaluation (3 beams, 30 new tokens); metrics.py for CIDEr / BLEU (checked
against pycocoevalcap) and VQA accuracy.
"""
import functools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
import distributed
import metrics
import toy
from media import MediaError


@dataclass
class EvalConfig:
    task: str                    # caption | vqa
    dataset: str                 # toy scores the attributes too
    modality: str
    batch_size: int = 16
    num_workers: int = 0
    num_beams: int = 3
    max_new_tokens: int = 30
    eval_samples: int = 0        # 0: every held-out item
    device: str = "cpu"
    autocast: object = field(default_factory=nullcontext)
    compile: bool = False        # the decode step (generate.py)
    fsdp: bool = False


def eval_batches(examples, features, tokenizer, transform, cfg: EvalConfig, blind=False, with_target=True,
                 max_batches: int | None = None):
    """(batch, own) for this process's share of the batches of `examples` (the first max_batches of them).
    Undecodable media are skipped with a warning (data.ExampleDataset) and counted (batch["dropped"]). A batch
    where nothing decodes comes empty; under FSDP it, and a stand-in turn, become a one-item stand-in batch
    whose results are dropped (own False): the other processes wait for it in every forward."""
    n = -(-len(examples) // cfg.batch_size)
    mine = distributed.my_batches(min(n, max_batches or n), cfg.fsdp)
    spans = [range(k * cfg.batch_size, min((k + 1) * cfg.batch_size, len(examples))) for k in mine if k is not None]
    collate = data.Collate(examples, tokenizer, blind=blind, with_target=with_target)
    loader = iter(torch.utils.data.DataLoader(
        data.ExampleDataset(examples, transform, features), batch_sampler=[list(s) for s in spans],
        num_workers=0 if features is not None else cfg.num_workers, collate_fn=collate))
    for k in mine:
        batch = next(loader) if k is not None else None
        if batch is not None and batch["index"]:
            yield batch, True
        elif cfg.fsdp:
            substitute = stand_in(examples, features, transform, collate)
            yield {**substitute, "dropped": batch["dropped"] if batch else 0}, False
        else:
            yield batch, False


def stand_in(examples, features, transform, collate):
    """A batch of the first example that decodes (decoded quietly: its failures were reported where they
    are the process's own)."""
    for i, e in enumerate(examples):
        try:
            return collate([(i, features[i] if features is not None else transform(e.media))])
        except MediaError:
            continue
    raise SystemExit("error: no held-out media could be decoded (each failure was named above)")


@torch.no_grad()
def predict(model, tokenizer, examples, features, transform, cfg: EvalConfig, blind=False) -> dict[str, str]:
    """Generated text per example id, on rank 0 (undecodable media are left out)."""
    rank, world = distributed.rank_and_world()
    all_done = functools.partial(distributed.all_ranks_done, device=cfg.device) if cfg.fsdp else None
    preds, failed = {}, 0
    total = len(distributed.my_batches(-(-len(examples) // cfg.batch_size), cfg.fsdp))
    batches = eval_batches(examples, features, tokenizer, transform, cfg, blind, with_target=False)
    for batch, own in tqdm(batches, total=total, desc="generating", unit="batch", leave=False, disable=rank != 0):
        failed += batch["dropped"]
        if not batch["index"]:
            continue
        media, feats = data.model_inputs(batch, cfg.device, cached=features is not None)
        with cfg.autocast:
            out = model.generate(media, batch["ids"].to(cfg.device), batch["mask"].to(cfg.device), features=feats,
                                 max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                 compile=cfg.compile and not cfg.fsdp,  # FSDP's hooks run collectives: no graphs
                                 all_done=all_done)
        if own:
            for i, tokens in zip(batch["index"], out):
                preds[examples[i].id] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # every process learns the total, so that all stop together under the same rule as training
    failed = int(distributed.sum_over_processes(torch.tensor([failed], device=cfg.device)).item())
    data.check_failures(failed, len(examples), "held-out media")
    return distributed.gather_to_master(preds)


def score(examples, preds: dict[str, str], cfg: EvalConfig) -> dict[str, float]:
    """The paper's metrics (CIDEr / BLEU for captions, VQA accuracy or exact match for answers), exact match,
    and in the toy world the accuracy per attribute. "items": how many items were scored."""
    examples = [e for e in examples if e.id in preds]
    if not examples:
        return {}
    out = {"items": len(examples)}
    if cfg.task == "caption":
        out.update(metrics.caption_scores({e.id: e.references for e in examples},
                                          {e.id: preds[e.id] for e in examples}))
        out["exact match"] = sum(metrics.normalize_answer(preds[e.id]) == metrics.normalize_answer(e.target)
                                 for e in examples) / len(examples)
    else:
        out["accuracy"] = sum(metrics.vqa_accuracy(preds[e.id], e.references) if len(e.references) > 1 else
                              metrics.exact_match(preds[e.id], e.references[0]) for e in examples) / len(examples)
    if cfg.dataset == "toy":
        out.update(toy.attribute_accuracy(cfg.modality, [(e.meta, preds[e.id]) for e in examples]))
    return out


def evaluate(model, tokenizer, examples, features, transform, run_dir: Path, cfg: EvalConfig, blind=False) -> dict:
    """Generate for the held-out examples (all, or cfg.eval_samples), score, and write predictions.jsonl and
    scores.json on rank 0 (the other processes return {})."""
    model.eval()
    n = cfg.eval_samples or len(examples)
    examples, features = examples[:n], None if features is None else features[:n]
    t0 = time.time()
    preds = predict(model, tokenizer, examples, features, transform, cfg, blind)
    rank, world = distributed.rank_and_world()
    if rank != 0:
        return {}
    print(f"generated for {len(preds):,} held-out items in {time.time() - t0:.1f} s ({world} process(es))")
    scores = score(examples, preds, cfg)
    with (run_dir / "predictions.jsonl").open("w") as f:
        for e in examples:
            if e.id in preds:
                f.write(json.dumps({"id": e.id, "prompt": e.prompt, "prediction": preds[e.id],
                                    "references": e.references}) + "\n")
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def results_table(scores: dict, blind: dict | None, split: str, chance: dict | None = None) -> str:
    """The held-out scores, next to the blind control's and, for the toy attributes, chance; the header says on
    how many items each column was computed."""
    chance = chance or {}
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
