"""train.py's settings resolved and checked: what the defaults at the top of train.py become for one run.

- `--dataset toy` (the default): the miniature world's preset (toy.train_preset) under what the user chose;
- a real data set: its modality and task (a contradiction is an error) and, unless given, the paper's backbones;
- `--eval_only`: the checkpoint's own data set, modality, task, evaluation and quantization settings (hub ids
  too);
- every value checked where it can be: ranges, combinations, the data set's folder and splits, each a one-line
  error naming the setting (configurator.fail). The injection window's fit to the LM is checked once the LM is
  loaded (model.injection_window).
"""
import os
from pathlib import Path

import benchmarks
import configurator
import data
import hub
import quantize
import toy

PAPER_BACKBONES = {"lm": "facebook/opt-2.7b", "image": "google/vit-base-patch16-224",
                   "video": "facebook/timesformer-base-finetuned-k400",
                   "audio": "MIT/ast-finetuned-audioset-10-10-0.4593"}


def resolve(argv: list[str], defaults: dict, types: dict, doc: str) -> dict:
    """The settings of a run: train.py's defaults, the toy preset (or a data set's modality, task and paper
    backbones), JSON files and flags (configurator.py), checked. `--help` lists the values the run would use."""
    if "-h" in argv or "--help" in argv:
        values = resolve([a for a in argv if a not in ("-h", "--help")], defaults, types, doc)
        configurator.print_help(doc, values, "settings (the values this run would use: the defaults, the toy "
                                "preset for --dataset toy, then your flags)")
    chosen = configurator.overrides(argv, defaults, doc, types)
    given = set(chosen)
    if chosen.get("eval_only"):
        chosen.update(checkpoint_settings(chosen, defaults))
    for k, allowed in [("modality", data.MODALITIES), ("task", ("caption", "vqa")), ("inject", ("late", "input")),
                       ("init_from", ("scratch", "resume")), ("dataset", ("toy", *benchmarks.DATASETS)),
                       ("dtype", ("float32", "bfloat16", "float16")), ("quantize", ("none", *quantize.MODES))]:
        if chosen.get(k, defaults[k]) not in allowed:
            configurator.fail(f"--{k} {chosen[k]}: expected one of {', '.join(allowed)}")
    notes = []  # said once the settings are known to be good
    name = chosen.get("dataset", defaults["dataset"])
    if name != "toy":  # a data set knows its modality and task (jsonl: --modality, and the fields of its files)
        benchmark = benchmarks.DATASETS[name]
        fixed = {"modality": benchmark.modality, "task": benchmark.task}
        if name == "jsonl" and Path(chosen.get("data_dir", "")).is_dir():
            try:
                fixed["task"] = benchmarks.dataset_task(name, chosen["data_dir"])
            except (OSError, ValueError) as e:
                configurator.fail(str(e))
        for k, v in fixed.items():
            if v is not None and chosen.get(k, v) != v:
                configurator.fail(f"--{k} {chosen[k]} contradicts --dataset {name} ({k}: {v})")
            chosen[k] = chosen.get(k, defaults[k]) if v is None else v
    # the miniature world's preset, under what the user chose: for its world, and for files on disk (jsonl, e.g.
    # `python toy.py --export`) trained on the toy backbones
    if name == "toy" or (name == "jsonl" and not {"lm", "encoder", "eval_only"} & set(chosen)):
        preset = toy.train_preset(chosen.get("modality", defaults["modality"]))
        if chosen.get("fsdp"):  # a second adapter around the same sharded backbones is not something FSDP allows
            preset["blind_control"] = False
        chosen = {**preset, **chosen}
    elif not chosen.get("eval_only"):  # the paper's backbones unless told otherwise (--eval_only: the checkpoint's)
        paper = {"lm": PAPER_BACKBONES["lm"], "encoder": PAPER_BACKBONES[chosen["modality"]]}
        unset = [k for k in paper if not chosen.get(k)]
        if unset:
            chosen.update({k: paper[k] for k in unset})
            notes.append(f"{name}: the paper's backbones by default: " +
                         ", ".join(f"--{k} {paper[k]}" for k in unset))
    ignored = [f"--{k}" for k in ("num_levels", "inject_start", "inject_end", "shared_connector") if k in given]
    if chosen.get("inject") == "input" and ignored:
        notes.append(f"--inject=input puts the last level's token at the input, with one connector: "
                     f"{', '.join(ignored)} ignored")
    settings = {**defaults, **chosen}
    check(settings)
    for line in notes if os.environ.get("RANK", "0") == "0" else []:
        print(line)
    return settings


def check(s: dict) -> None:
    """Ranges and combinations, each a one-line error naming the setting. Whether the injection window fits the
    LM is known once the LM is loaded (model.injection_window says so)."""
    at_least = {"max_iters": 1, "batch_size": 1, "grad_accum": 1, "eval_interval": 1, "eval_iters": 1,
                "log_interval": 1, "num_levels": 1, "inject_start": 0, "inject_end": 1, "prompt_length": 0,
                "warmup_iters": 0, "lr_decay_iters": 1, "lr": 0, "prompt_lr": 0,
                "weight_decay": 0, "min_lr_ratio": 0, "grad_clip": 0, "num_workers": 0, "eval_samples": 0,
                "num_beams": 1, "max_new_tokens": 1, "toy_train_samples": 1, "toy_eval_samples": 1, "seed": 0,
                "media_tokens": 1}
    for k, low in at_least.items():
        if s.get(k) is not None and s[k] < low:
            configurator.fail(f"--{k} {s[k]}: expected at least {low}")
    if s["min_lr_ratio"] > 1:
        configurator.fail(f"--min_lr_ratio {s['min_lr_ratio']}: expected at most 1 (a fraction of --lr)")
    start, end = s["inject_start"], s["inject_end"]
    if s["inject"] == "late" and start is not None and end is not None:
        if start >= end:
            configurator.fail(f"--inject_start {start} --inject_end {end}: the injection window [{start}, {end}) "
                              "is empty")
        if end - start < s["num_levels"]:
            configurator.fail(f"--num_levels {s['num_levels']}: more levels than the {end - start} layers of the "
                              f"injection window [{start}, {end}) (--inject_start, --inject_end)")
    if s["quantize_group_size"] not in quantize.GROUP_SIZES:
        configurator.fail(f"--quantize_group_size {s['quantize_group_size']}: expected one of "
                          f"{', '.join(map(str, quantize.GROUP_SIZES))}")
    if s["quantize_encoder"] and s["quantize"] == "none":
        configurator.fail("--quantize_encoder quantizes the encoder as --quantize does the LM: give --quantize int8 "
                          "or int4 too")
    if s["fsdp"] and s["quantize"] != "none":
        configurator.fail(f"--quantize {s['quantize']} with --fsdp: FSDP2 shards floating-point parameters, and the "
                          "quantized weights are integer buffers it would copy whole to every process; quantized, "
                          "one GPU holds the LM (OPT-6.7B in int4: 3.9 GB): run without --fsdp")
    problem = quantize.cpu_dtype_problem(s["quantize"], s["dtype"], s["device"])
    if problem:
        configurator.fail(problem)
    if s["fsdp"] and s["blind_control"]:
        configurator.fail("--blind_control needs a second adapter around the same backbones, which FSDP cannot "
                          "shard twice: run the control without --fsdp")
    if s["dataset"] != "toy":
        benchmark = benchmarks.DATASETS[s["dataset"]]
        if not s["data_dir"]:
            configurator.fail(f"--dataset {s['dataset']} needs --data_dir, its root folder ({benchmark.layout})")
        if not Path(s["data_dir"]).is_dir():
            configurator.fail(f"--data_dir {s['data_dir']}: no such folder (a {s['dataset']} root holds "
                              f"{benchmark.layout})")
        if s["eval_split"] not in benchmark.splits:
            configurator.fail(f"--eval_split {s['eval_split']}: {s['dataset']} has the splits "
                              f"{', '.join(benchmark.splits)}")


def checkpoint_settings(chosen: dict, defaults: dict) -> dict:
    """--eval_only: a checkpoint knows what it was trained on (modality, task, data set, data_dir) and how it was
    evaluated (beams, tokens, the toy world's seed and held-out size): score it on that, unless given. out_dir is
    a run's folder, or a hub repository (USER/NAME): its ckpt.safetensors is downloaded (hub.adapter_path) and
    copied to out/USER/NAME, with what it is scored on."""
    name = chosen.get("out_dir") or \
        f"out/{chosen.get('modality', defaults['modality'])}-{chosen.get('task', defaults['task'])}"
    local = not chosen.get("out_dir") or Path(name).exists() or not hub.REPO_ID.fullmatch(name)
    ckpt = Path(name, "ckpt.safetensors") if local else None
    if local and not ckpt.exists():
        configurator.fail(f"--eval_only: no checkpoint at {ckpt} (train first, or pass --out_dir)")
    try:
        ckpt = ckpt or hub.adapter_path(name)
        _, trained = hub.load_adapter(ckpt)
    except (OSError, ValueError) as e:
        configurator.fail(f"--eval_only: {e}")
    out = ckpt.parent if local else Path("out", *name.split("/"))
    if not local:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ckpt.safetensors.tmp").write_bytes(ckpt.read_bytes())
        os.replace(out / "ckpt.safetensors.tmp", out / "ckpt.safetensors")
    return {"out_dir": str(out), **{k: trained[k] for k in ("modality", "task", "dataset")},
            "data_dir": chosen.get("data_dir", trained.get("data_dir", "")),
            **{k: trained[k] for k in ("num_beams", "max_new_tokens", "seed", "toy_eval_samples", "quantize_group_size",
                                       "quantize_encoder") if k in trained and k not in chosen},
            **({} if "quantize" in chosen else {"quantize": trained.get("quantize") or "none"})}
