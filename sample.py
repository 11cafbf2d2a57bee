"""Caption, or answer a question about, images, audio clips and videos with a trained eP-ALM checkpoint.

    python sample.py --image cat.jpg
    python sample.py --image cat.jpg dog.png --question "what is in the picture?"
    python sample.py --audio clip.wav --checkpoint out/audio-caption --num_beams 3
    python sample.py --video clip.mp4 --temperature 0.8 --top_p 0.9

    python sample.py --image cat.jpg --checkpoint USER/NAME   # an adapter shared on the hub

Without --checkpoint it uses the default run of train.py for the modality and task (out/{modality}-{task}).
The checkpoint holds only the adaptation parameters; its configuration names the frozen backbones and how train.py
evaluated it (beams, length), which sample.py decodes with unless told otherwise. Settings are read as train.py
reads them (`--key value` or `--key=value`, see configurator.py); `--help` lists them.
"""
import sys
from pathlib import Path

import torch

import configurator
import data
import hub
import quantize as quantization
from checkpoint import load_model

image = []                  # files to caption or ask about, all generated for in one batch
audio = []                  # (wav natively; flac, mp3, ogg, m4a with PyAV)
video = []                  # (mp4, avi, webm, mkv, mov with PyAV; GIFs and folders of frames without)
question = ""               # ask this question (VQA) instead of captioning
checkpoint = ""             # a run's out_dir, its ckpt.safetensors or a hub id (USER/NAME); "" = out/{modality}-{task}
num_beams: int | None = None       # None: as train.py evaluated the checkpoint (1 when sampling)
temperature = 0.0           # 0: greedy (or beam search); > 0: sampling
top_k: int | None = None    # sampling: only the k likeliest tokens
top_p: float | None = None  # sampling: only the likeliest tokens holding this much probability
max_new_tokens: int | None = None  # None: as train.py evaluated the checkpoint
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # CPUs without bf16 instructions: fp32
quantize: str | None = None  # None: as the checkpoint was trained; none | int8 | int4, the frozen LM (quantize.py)
quantize_group_size: int | None = None  # int4: inputs sharing a scale and a zero (32, 64, 128); None: the checkpoint's
debug = False               # show the traceback of errors (EPALM_DEBUG=1 too), not only their one line


def settings(argv: list[str]) -> dict:
    """The defaults above under the command line (configurator.py), checked."""
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and
                isinstance(v, (int, float, bool, str, list, type(None)))}
    args = {**defaults, **configurator.overrides(argv, defaults, __doc__, configurator.annotated_types(globals()))}
    check_settings(args)
    return args


def check_settings(s: dict) -> None:
    """Ranges and combinations, each a one-line error naming the setting."""
    given = [m for m in data.MODALITIES if s[m]]
    if len(given) != 1:
        configurator.fail(f"give the files of exactly one modality: --image, --audio or --video "
                          f"(got {', '.join('--' + m for m in given) or 'none'})")
    if s["dtype"] not in ("float32", "bfloat16", "float16"):
        configurator.fail(f"--dtype {s['dtype']}: expected float32, bfloat16 or float16")
    for k, low in {"num_beams": 1, "max_new_tokens": 1, "top_k": 1, "temperature": 0, "seed": 0}.items():
        if s[k] is not None and s[k] < low:
            configurator.fail(f"--{k} {s[k]}: expected at least {low}")
    if s["top_p"] is not None and not 0 < s["top_p"] <= 1:
        configurator.fail(f"--top_p {s['top_p']}: expected a probability in (0, 1]")
    for k in ("top_k", "top_p"):
        if s[k] is not None and s["temperature"] == 0:
            configurator.fail(f"--{k} {s[k]} filters what sampling draws from: give --temperature above 0 too")
    if s["quantize"] not in (None, "none", *quantization.MODES):
        configurator.fail(f"--quantize {s['quantize']}: expected one of none, {', '.join(quantization.MODES)}")
    if s["quantize_group_size"] not in (None, *quantization.GROUP_SIZES):
        configurator.fail(f"--quantize_group_size {s['quantize_group_size']}: expected one of "
                          f"{', '.join(map(str, quantization.GROUP_SIZES))}")
    if s["temperature"] > 0 and (s["num_beams"] or 1) > 1:
        configurator.fail(f"--num_beams {s['num_beams']} searches, --temperature {s['temperature']} samples: "
                          "give one of them")


def main(args: dict) -> int:
    modality = next(m for m in data.MODALITIES if args[m])
    files = args[modality]
    task = "vqa" if args["question"] else "caption"
    path = args["checkpoint"] or f"out/{modality}-{task}"
    if not args["checkpoint"] and not Path(path, "ckpt.safetensors").exists():
        configurator.fail(f"no checkpoint at {path}/ckpt.safetensors: train one first with `python train.py "
                          f"--modality {modality} --task {task}`, or pass --checkpoint")
    # a file, a run's folder or a hub repository (hub.adapter_path); what cannot load is a one-line error (run).
    # The checkpoint's quantization, unless given, decides whether --dtype suits the device: read it first
    trained = hub.load_adapter(hub.adapter_path(path))[1]
    overrides = {k: args[k] for k in ("quantize", "quantize_group_size") if args[k] is not None}
    problem = quantization.cpu_dtype_problem(overrides.get("quantize", trained.get("quantize")), args["dtype"],
                                             args["device"])
    if problem:
        configurator.fail(problem)
    model, tokenizer, config = load_model(path, dtype=getattr(torch, args["dtype"]), quantization=overrides)
    if config["modality"] != modality:
        configurator.fail(f"{path} was trained on {config['modality']}, not {modality}")
    if config.get("task") == "vqa" and not args["question"]:
        configurator.fail(f"{path} was trained to answer questions (VQA): ask one with --question")
    # what train.py evaluated the checkpoint with (checkpoints without it: greedy, 30 tokens), unless given
    num_beams = args["num_beams"] or (1 if args["temperature"] > 0 else config.get("num_beams", 1))
    max_new_tokens = args["max_new_tokens"] or config.get("max_new_tokens", 30)
    transform = data.MediaTransform.for_encoder(modality, model.encoder)
    media = torch.stack([transform(f) for f in files])  # a file that cannot be read: media.MediaError
    prompt = data.vqa_prompt(args["question"]) if args["question"] else ""
    ids, mask, _ = data.text_batch(tokenizer, [prompt] * len(files))
    torch.manual_seed(args["seed"])
    model.to(args["device"])
    device_type = torch.device(args["device"]).type
    precision = torch.autocast(device_type, getattr(torch, args["dtype"]), enabled=args["dtype"] != "float32")
    with precision:  # as train.py evaluates: weights in dtype, the adapter in float32, autocast between them
        out = model.generate(media.to(args["device"]), ids.to(args["device"]), mask.to(args["device"]),
                             max_new_tokens=max_new_tokens, num_beams=num_beams,
                             temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"])
    for f, tokens in zip(files, out):
        print(f"{f}: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    return 0


if __name__ == "__main__":
    args = settings(sys.argv[1:])
    sys.exit(configurator.run(lambda: main(args), args["debug"]))
