"""Caption, or answer a question about, images, audio clips and videos with a trained eP-ALM checkpoint.

    python sample.py --image cat.jpg
    python sample.py --image cat.jpg dog.png --question "what is in the picture?"
    python sample.py --audio clip.wav --checkpoint out/audio-caption --num_beams 3
    python sample.py --video clip.mp4 --temperature 0.8 --top_p 0.9

    python sample.py --image cat.jpg --checkpoint USER/NAME   # an adapter shared on the hub

Without --checkpoint it uses the default run of train.py for the modality and task (out/{modality}-{task}).
The checkpoint holds only the adaptation parameters; its configuration names the frozen backbones. Settings are
read as train.py reads them (`--key value` or `--key=value`, see configurator.py); `--help` lists them.
"""
import sys
from pathlib import Path

import torch

import configurator
import data
from media import MediaError
from model import from_checkpoint

image = []                  # files to caption or ask about, all generated for in one batch
audio = []                  # (wav natively; flac, mp3, ogg, m4a with PyAV)
video = []                  # (mp4, avi, webm, mkv, mov with PyAV; GIFs and folders of frames without)
question = ""               # ask this question (VQA) instead of captioning
checkpoint = ""             # a run's out_dir, its ckpt.safetensors or a hub id (USER/NAME); "" = out/{modality}-{task}
num_beams = 1
temperature = 0.0           # 0: greedy (or beam search); > 0: sampling
top_k = None
top_p = None
max_new_tokens = 30
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # CPUs without bf16 instructions: fp32


def main(argv=None) -> int:
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and
                isinstance(v, (int, float, bool, str, list, type(None)))}
    args = {**defaults, **configurator.overrides(sys.argv[1:] if argv is None else argv, defaults, __doc__)}
    given = [m for m in data.MODALITIES if args[m]]
    if len(given) != 1:
        configurator.fail(f"give the files of exactly one modality: --image, --audio or --video "
                          f"(got {', '.join('--' + m for m in given) or 'none'})")
    if args["dtype"] not in ("float32", "bfloat16", "float16"):
        configurator.fail(f"--dtype {args['dtype']}: expected float32, bfloat16 or float16")
    modality, files = given[0], args[given[0]]
    task = "vqa" if args["question"] else "caption"
    path = args["checkpoint"] or f"out/{modality}-{task}"
    if not args["checkpoint"] and not Path(path, "ckpt.safetensors").exists():
        print(f"error: no checkpoint at {path}/ckpt.safetensors: train one first with `python train.py --modality "
              f"{modality} --task {task}`, or pass --checkpoint", file=sys.stderr)
        return 1
    try:  # a file, a run's folder or a hub repository (hub.adapter_path)
        model, tokenizer, config = from_checkpoint(path, dtype=getattr(torch, args["dtype"]))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if config["modality"] != modality:
        print(f"error: {path} was trained on {config['modality']}, not {modality}", file=sys.stderr)
        return 1
    transform = data.MediaTransform.for_encoder(modality, model.encoder)
    try:
        media = torch.stack([transform(f) for f in files])
    except MediaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompt = data.vqa_prompt(args["question"]) if args["question"] else ""
    ids, mask, _ = data.text_batch(tokenizer, [prompt] * len(files))
    torch.manual_seed(args["seed"])
    model.to(args["device"])
    device_type = torch.device(args["device"]).type
    precision = torch.autocast(device_type, getattr(torch, args["dtype"]), enabled=args["dtype"] != "float32")
    with precision:  # as train.py evaluates: weights in dtype, the adapter in float32, autocast between them
        out = model.generate(media.to(args["device"]), ids.to(args["device"]), mask.to(args["device"]),
                             max_new_tokens=args["max_new_tokens"], num_beams=args["num_beams"],
                             temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"])
    for f, tokens in zip(files, out):
        print(f"{f}: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
