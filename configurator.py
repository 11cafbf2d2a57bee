"""Command-line settings for train.py and sample.py, in nanoGPT's spirit: a script keeps its settings as plain
defaults at its top; the command line overrides them.

    python train.py --modality audio --max_iters=200 my_run.json
    python sample.py --image cat.jpg dog.png --num_beams 3

- `--key value` and `--key=value` both work (`--max-new-tokens` is `--max_new_tokens`);
- a boolean alone means True (`--eval_only`), or takes True/False after it (`--compile False`);
- a list setting (sample.py's `--image`) takes every argument up to the next flag;
- a bare argument is a JSON file of settings, applied before the flags;
- an unknown setting, a missing value or a value of the wrong type is a one-line error naming the setting; a
  setting whose default is None takes the type of its annotation (`top_k: int | None = None`);
- `run(main)`: the errors deeper code already words (a missing file, a bad value, an unreachable download) reach
  the user as one line too; `--debug` or EPALM_DEBUG=1 shows their traceback.

Reference: karpathy/nanoGPT's configurator.py (which reads only `--key=value` and exec's config files; here
config files are JSON and nothing is exec'd).
"""
import ast
import difflib
import json
import os
import sys
import types
from pathlib import Path

KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", list: "one or more values"}


def fail(message: str):
    sys.exit(f"error: {message}")


def run(main, debug: bool = False):
    """main(), with a ValueError or OSError (FileNotFoundError, ConnectionError; media.MediaError is a ValueError)
    as one line: these are raised with messages that name the file or setting and the cause. Every other
    exception is a bug and keeps its traceback; so do these with --debug or EPALM_DEBUG=1."""
    try:
        return main()
    except (ValueError, OSError) as e:
        if debug or os.environ.get("EPALM_DEBUG", "0") not in ("", "0"):
            raise
        fail(" ".join(str(e).split()) or type(e).__name__)


def annotated_types(namespace: dict) -> dict[str, type]:
    """The types of a script's settings whose default is None, from their annotations: `top_k: int | None = None`
    -> {"top_k": int}."""
    out = {}
    for k, hint in namespace.get("__annotations__", {}).items():
        args = hint.__args__ if isinstance(hint, types.UnionType) else (hint,)
        out[k] = next(t for t in args if t is not type(None))
    return out


def parse_value(key: str, raw, default, kind: type | None = None):
    """raw (a command-line string, or a value from a JSON file) as the type of the setting's default, or as `kind`
    when the default is None (None stays None)."""
    if default is None and kind is not None and raw not in (None, "None"):
        return parse_value(key, raw, kind())
    if isinstance(default, list):
        return [str(v) for v in raw] if isinstance(raw, list) else [str(raw)]
    if isinstance(raw, str) and isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if isinstance(raw, str) and not isinstance(default, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if default is not None:
                fail(f"--{key} {raw}: expected {KINDS[type(default)]}")
    if default is None:  # a setting without a fixed type
        return raw
    if raw is None:
        fail(f"--{key} None: expected {KINDS[type(default)]}")
    if isinstance(default, float) and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, type(default)) or (isinstance(raw, bool) and not isinstance(default, bool)):
        fail(f"--{key} {raw!r}: expected {KINDS[type(default)]}")
    return raw


def known_key(flag: str, defaults: dict) -> str:
    key = flag.removeprefix("--").replace("-", "_")
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        fail(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else "") +
             "; --help lists the settings")
    return key


def print_help(doc: str, values: dict, heading: str):
    print(doc.strip() + f"\n\n{heading}:")
    for k, v in values.items():
        print(f"  --{k} {v!r}")
    sys.exit(0)


def overrides(argv: list[str], defaults: dict, doc: str = "", kinds: dict[str, type] | None = None) -> dict:
    """The settings argv changes: JSON files (bare arguments) first, then the flags, checked against the types
    of `defaults` (and `kinds` for those whose default is None, see annotated_types). `--help` prints doc and the
    settings with their defaults."""
    if "-h" in argv or "--help" in argv:
        print_help(doc, defaults, "settings (default)")
    files, flags, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            files.append(arg)
            continue
        if "=" in arg:
            flag, value = arg.split("=", 1)
            key = known_key(flag, defaults)
            flags[key] = value.split() if isinstance(defaults[key], list) else value
            continue
        key = known_key(arg, defaults)
        following = []
        while i < len(argv) and not argv[i].startswith("--"):
            following.append(argv[i])
            i += 1
            if not isinstance(defaults[key], list):
                break
        if isinstance(defaults[key], bool) and (not following or following[0].lower() not in ("true", "false")):
            flags[key] = True  # a bare switch; what followed it, if anything, is a config file
            i -= len(following)
        elif not following:
            kind = (kinds or {}).get(key, type(defaults[key]))
            fail(f"--{key}: missing value (expected {KINDS.get(kind, 'a value')})")
        elif isinstance(defaults[key], bool):
            flags[key] = following[0].lower() == "true"
        else:
            flags[key] = following if isinstance(defaults[key], list) else following[0]
    chosen = {}
    for f in files:
        try:
            loaded = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            fail(f"config file {f}: {e}")
        if not isinstance(loaded, dict):
            fail(f"config file {f}: expected a JSON object of settings")
        for k, v in loaded.items():
            chosen[known_key(k, defaults)] = v
    chosen.update(flags)
    return {k: parse_value(k, v, defaults[k], (kinds or {}).get(k)) for k, v in chosen.items()}
