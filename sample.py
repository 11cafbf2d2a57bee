"""Caption, or answer a question about, images, audio clips and videos with a trained eP-ALM checkpoint.

    python sample.py --image cat.jpg
    python sample.py --image cat.jpg dog.png --question "what is in the picture?"
    python sample.py --audio clip.wav --checkpoint out/audio-caption --num_beams 3
    python sample.py --video clip.mp4 --temperature 0.8 --top_p 0.9

Without --checkpoint it uses the default run of train.py for the modality and task (out/{modality}-{task}).
The checkpoint holds only the adaptation parameters; its configuration names the frozen backbones.
"""
import argparse
import sys
from pathlib import Path

import torch

import data
from media import MediaError
from model import from_checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    media = p.add_mutually_exclusive_group(required=True)
    for m in data.MODALITIES:
        media.add_argument(f"--{m}", nargs="+", metavar="FILE", help=f"{m} file(s), generated for in one batch")
    p.add_argument("--question", help="ask this question (VQA) instead of captioning")
    p.add_argument("--checkpoint", help="a run's out_dir or its ckpt.safetensors (default: out/{modality}-{task})")
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy / beam search; > 0: sampling")
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    modality = next(m for m in data.MODALITIES if getattr(args, m))
    files = getattr(args, modality)
    task = "vqa" if args.question else "caption"
    path = Path(args.checkpoint or f"out/{modality}-{task}")
    if path.is_dir():
        path = path / "ckpt.safetensors"
    if not path.exists():
        hint = "" if args.checkpoint else f": train one first with `python train.py --modality={modality} --task={task}`"
        print(f"error: no checkpoint at {path}{hint}, or pass --checkpoint", file=sys.stderr)
        return 1
    try:
        model, tokenizer, config = from_checkpoint(path)
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
    prompt = data.vqa_prompt(args.question) if args.question else ""
    ids, mask, _ = data.text_batch(tokenizer, [prompt] * len(files))
    torch.manual_seed(args.seed)
    model.to(args.device)
    out = model.generate(media.to(args.device), ids.to(args.device), mask.to(args.device),
                         max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for f, tokens in zip(files, out):
        print(f"{f}: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
