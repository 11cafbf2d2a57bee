"""The model card of a training run: README.md beside ckpt.safetensors, so that `hf upload USER/NAME out/RUN`
publishes a repository that the hub describes and that `sample.py --checkpoint USER/NAME` uses.

The front matter is written by hand (plain key: value lines and lists, no YAML library). It has no `datasets`:
the benchmarks are read from local copies (benchmarks.py), whose hub ids are not known. train.py writes a card
with each checkpoint, and the final one, with the held-out scores, when the run ends.

References: the hub's model cards (huggingface.co/docs/hub/model-cards: base_model, base_model_relation,
library_name, tags, datasets, metrics, model-index) and huggingface_hub's templates/modelcard_template.md.
"""
import json
import os
import shlex
from pathlib import Path

import hub
from quantize import parameter_count

TASK_WORDS = {"caption": "captioning", "vqa": "question answering"}
HUB_TASKS = {("image", "caption"): "image-to-text", ("image", "vqa"): "visual-question-answering",
             ("audio", "caption"): "audio-text-to-text", ("audio", "vqa"): "audio-text-to-text",
             ("video", "caption"): "video-text-to-text", ("video", "vqa"): "video-text-to-text"}


def metric_id(score: str) -> str:
    """The hub's metric id (huggingface.co/metrics) of one of evaluate.score's names."""
    if score.startswith("BLEU"):
        return "bleu"
    return {"CIDEr": "cider", "exact match": "exact_match"}.get(score, "accuracy")


def hub_model(name: str) -> bool:
    """Whether a backbone's name is a hub id, rather than a local folder or one of the toy backbones."""
    return "/" in name and hub.REPO_ID.fullmatch(name) is not None and hub.toy_backbone(name) is None and \
        not Path(name).exists()


def describe(name: str) -> str:
    if hub.toy_backbone(name) is not None:
        return f"`{name}`, a toy backbone of the miniature world (epalm's toy/ folder, not a hub model)"
    return f"[`{name}`](https://huggingface.co/{name})" if hub_model(name) else f"`{name}` (a local folder)"


def front_matter(config: dict, scores: dict | None, split: str) -> str:
    modality, task = config["modality"], config["task"]
    bases = [n for n in (config["lm"], config["encoder"]) if hub_model(n)]
    lines = ["---", "library_name: epalm", "tags:", "- epalm", "- eP-ALM", f"- {modality}",
             f"- {TASK_WORDS[task].replace(' ', '-')}"] + (["- toy"] if config["dataset"] == "toy" else [])
    if bases:
        lines += ["base_model:", *[f"- {n}" for n in bases], "base_model_relation: adapter"]
    else:
        lines.append(f"# no base_model: {config['lm']} and {config['encoder']} are not hub models (toy/: the "
                     "toy backbones of epalm's miniature world)")
    named = [k for k in scores or {} if k != "items"]
    if named:
        lines += ["metrics:", *[f"- {m}" for m in dict.fromkeys(map(metric_id, named))], "model-index:",
                  f"- name: epalm-{modality}-{task}", "  results:", "  - task:",
                  f"      type: {HUB_TASKS[modality, task]}", "    dataset:",
                  f"      type: {config['dataset']}", f"      name: {json.dumps(config['dataset'] + ' ' + split)}",
                  f"      split: {json.dumps(split)}", "    metrics:"]
        for k in named:  # json.dumps: a quoted string or a number, both valid YAML scalars
            lines += [f"    - type: {metric_id(k)}", f"      name: {json.dumps(k)}",
                      f"      value: {json.dumps(round(scores[k], 4))}"]
    return "\n".join(lines + ["---"])


def scores_table(scores: dict, blind: dict | None) -> str:
    head = "| held-out | eP-ALM |" + (" blind control |" if blind else "")
    rows = [head, "|---|---:|" + ("---:|" if blind else ""),
            f"| items scored | {scores.get('items', 0):,} |" + (f" {blind.get('items', 0):,} |" if blind else "")]
    for k, v in scores.items():
        if k != "items":
            rows.append(f"| {k} | {v:.4f} |" + (f" {blind.get(k, float('nan')):.4f} |" if blind else ""))
    return "\n".join(rows)


def model_card(model, config: dict, command: list[str], scores: dict | None = None, blind: dict | None = None,
               split: str = "") -> str:
    """README.md of a run: model the trained EPALM, config what its ckpt.safetensors records (train.run_config and
    "iter"), command the arguments train.py was given, scores and blind the held-out scores of the run and of
    its blind control (None before the final evaluation), split the held-out split they were computed on."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = parameter_count(model)  # a quantized weight counts as the parameters it stands for
    modality, task = config["modality"], config["task"]
    run = shlex.join(["python", "train.py", *command])
    question = ' --question "what is in it?"' if task == "vqa" else ""
    data = "the miniature world (toy.py), scored on attribute combinations never seen in training" \
        if config["dataset"] == "toy" else f"{config['dataset']}, scored on its {split} split"
    text = f"""{front_matter(config, scores, split)}

# eP-ALM adapter: {modality} {TASK_WORDS[task]}

The adaptation parameters of eP-ALM (Shukor, Dancette, Cord, "eP-ALM: Efficient Perceptual Augmentation of
Language Models", ICCV 2023; official code github.com/mshukor/eP-ALM), trained with epalm, a minimal
reimplementation. The frozen language model {describe(config['lm'])} is given {modality} perception: the [CLS]
tokens of the last {config['epalm']['num_levels']} blocks of the frozen encoder {describe(config['encoder'])} go
through a linear connector{tokens_each(model)}
into its layers {model.start} to {model.end - 1} (of {len(model.lm.layers)}), after a soft prompt of
{config['epalm']['prompt_length']} vectors. Only those train: {trainable:,} parameters
({100 * trainable / total:.3f}% of {total:,}). `ckpt.safetensors` holds them with the run's configuration as
metadata; that configuration names the backbones, which load from where it says{quantized(config)}.

## Use

    python sample.py --{modality} FILE{question} --checkpoint USER/NAME

in a clone of epalm, USER/NAME being this repository (or the run's folder, before it is uploaded).

## Training

    {run}

Data: {data}. Iterations: {config['iter']:,}.

## Held-out scores

"""
    if scores:
        text += scores_table(scores, blind) + "\n"
        if blind:
            text += "\nThe blind control: the same recipe, trained and scored with the media blanked.\n"
    else:
        text += "Not scored yet: the scores are written when the run ends.\n"
    return text


def tokens_each(model) -> str:
    """How many LM tokens each [CLS] level becomes, as a clause (one, as in eP-ALM, says nothing)."""
    m = getattr(model, "media_tokens", 1)
    return "" if m == 1 else f" ({m} tokens each, one per query head sharing a key-value head)"


def quantized(config: dict) -> str:
    """How the frozen backbones were quantized in training (sample.py loads them so too), as a clause."""
    mode = config.get("quantize")
    if not mode:
        return ""
    group = f", groups of {config['quantize_group_size']} inputs" if mode == "int4" else ""
    what = "the LM's and the encoder's" if config.get("quantize_encoder") else "the LM's"
    return f", {what} linear layers in weight-only {mode}{group}, as in training"


def write_card(run_dir: Path, text: str) -> None:
    """README.md in run_dir, written to a temporary file and renamed, as the checkpoint is."""
    tmp = Path(run_dir) / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, Path(run_dir) / "README.md")
