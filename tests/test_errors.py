"""Every bad value given to train.py or sample.py is one line on stderr, `error: ...` naming the setting or file,
with a non-zero exit and no traceback; --debug and EPALM_DEBUG=1 bring the traceback back. Most rows fail before
any model loads; those that need one load the tiny backbones of conftest.py."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TESTDATA, coco_layout

IMAGE = str(TESTDATA / "images" / "hopper.jpg")

# (script, arguments, words the error line holds); {lm} {vit} {photo} {tmp} {coco} {bad_coco} are filled in below
TABLE = [
    ("train.py", "--max_iters -5", "--max_iters -5: expected at least 1"),
    ("train.py", "--grad_accum 0", "--grad_accum 0: expected at least 1"),
    ("train.py", "--batch_size 0", "--batch_size 0: expected at least 1"),
    ("train.py", "--eval_interval 0", "--eval_interval 0: expected at least 1"),
    ("train.py", "--prompt_length -1", "--prompt_length -1: expected at least 0"),
    ("train.py", "--media_tokens 0", "--media_tokens 0: expected at least 1"),
    ("train.py", "--max_iters None", "--max_iters None: expected an integer"),
    ("train.py", "--num_levels 100", "--num_levels 100: more levels than the 2 layers of the injection window"),
    ("train.py", "--inject_start 3 --inject_end 2", "--inject_start 3 --inject_end 2: the injection window [3, 2) "
     "is empty"),
    ("train.py", "--inject_start abc", "--inject_start abc: expected an integer"),
    ("train.py", "--lr_decay_iters 1.5", "--lr_decay_iters 1.5: expected an integer"),
    ("train.py", "--min_lr_ratio 2", "--min_lr_ratio 2.0: expected at most 1"),
    ("train.py", "--lm nonexistent/model", "cannot download nonexistent/model/config.json: offline"),
    ("train.py", "--lm /etc", "/etc/config.json: not found"),
    ("train.py", "--lm {lm} --encoder {tmp}", "{tmp}/config.json: not found"),
    ("train.py", "--lm {lm} --encoder {vit} --inject_end 10", "injection window [1, 10) does not fit 2 levels "
     "into an LM of 4 layers"),
    ("train.py", "--modality image --dataset audiocaps --data_dir {tmp}", "--modality image contradicts --dataset "
     "audiocaps (modality: audio)"),
    ("train.py", "--task vqa --dataset coco --data_dir {tmp}", "--task vqa contradicts --dataset coco (task: "
     "caption)"),
    ("train.py", "--dataset coco", "--dataset coco needs --data_dir"),
    ("train.py", "--dataset coco --data_dir {tmp}/nowhere", "--data_dir {tmp}/nowhere: no such folder"),
    ("train.py", "--dataset coco --data_dir {coco} --eval_split testdev", "--eval_split testdev: coco has the "
     "splits train, val, test"),
    ("train.py", "--dataset coco --data_dir {bad_coco} --lm {lm} --encoder {vit} --num_levels 2",
     "{bad_coco}: malformed coco annotations (KeyError"),
    ("train.py", "--dataset coco --data_dir {tmp} --lm {lm} --encoder {vit} --num_levels 2",
     "{tmp}/dataset_coco.json: missing coco annotation file"),
    ("train.py", "--dataset coco --data_dir {coco} --lm {lm} --encoder {vit} --num_levels 4",
     "--num_levels 4: more levels than the 3 blocks of the encoder"),
    ("train.py", "--dataset coco --data_dir {coco}", "cannot download facebook/opt-2.7b/config.json: offline"),
    ("train.py", "--eval_only --out_dir {tmp}", "--eval_only: no checkpoint at {tmp}/ckpt.safetensors"),
    ("train.py", "--modality audio --lm {lm} --encoder {vit}", "{vit}: model_type 'vit' is not an audio encoder "
     "(AST): expected audio-spectrogram-transformer"),
    ("train.py", "--lm {lm} --encoder {siglip}", "{siglip}: model_type 'siglip_vision_model' is not an image encoder: "
     "SigLIP pools through an attention head, it has no [CLS] token to inject"),
    ("train.py", "--fsdp --quantize int8", "--quantize int8 with --fsdp: FSDP2 shards floating-point parameters"),
    ("train.py", "--quantize int4 --dtype bfloat16", "--quantize int4 with --dtype bfloat16 on a CPU: the quantized "
     "weights are dequantized into bfloat16 for every matmul"),
    ("train.py", "--quantize_encoder", "--quantize_encoder quantizes the encoder as --quantize does the LM"),
    ("train.py", "--quantize int4 --quantize_group_size 32 --lm {lm} --encoder {vit}", "layers.0.q_proj has 16 "
     "inputs, which int4 groups of 32 do not divide (group sizes that do: none)"),
    ("sample.py", "--image {photo} --quantize int3", "--quantize int3: expected one of none, int8, int4"),
    ("sample.py", "--image {photo} --max_new_tokens -1", "--max_new_tokens -1: expected at least 1"),
    ("sample.py", "--image {photo} --num_beams 0", "--num_beams 0: expected at least 1"),
    ("sample.py", "--image {photo} --temperature -1", "--temperature -1.0: expected at least 0"),
    ("sample.py", "--image {photo} --top_p 2 --temperature 1", "--top_p 2.0: expected a probability in (0, 1]"),
    ("sample.py", "--image {photo} --top_k x", "--top_k x: expected an integer"),
    ("sample.py", "--image {photo} --top_k 0 --temperature 1", "--top_k 0: expected at least 1"),
    ("sample.py", "--image {photo} --top_p 0.9", "--top_p 0.9 filters what sampling draws from: give --temperature "
     "above 0 too"),
    ("sample.py", "--image {photo} --temperature 0.8 --num_beams 3", "--num_beams 3 searches, --temperature 0.8 "
     "samples"),
]


def run(script, args, tmp_path, debug=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("EPALM_DEBUG", None)
    if debug:
        env["EPALM_DEBUG"] = debug
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


@pytest.fixture
def places(tiny_backbones, tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad_coco"
    bad.mkdir()
    (bad / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "train", "filepath": "val2014"}]}))
    (tmp_path / "siglip").mkdir()  # SigLIP's vision tower as transformers saves it (the weights are never read)
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model",
                                                                  "hidden_size": 16, "patch_size": 8}))
    return {"lm": tiny_backbones["lm"], "vit": tiny_backbones["image"], "photo": IMAGE, "tmp": str(tmp_path / "empty"),
            "coco": str(coco_layout(tmp_path / "coco")), "bad_coco": str(bad), "siglip": str(tmp_path / "siglip")}


@pytest.mark.parametrize("script, args, words", TABLE, ids=[f"{s} {a}" for s, a, _ in TABLE])
def test_bad_value_is_one_line(places, tmp_path, script, args, words):
    p = run(script, [a.format(**places) for a in args.split()], tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], p.stderr[-3000:]
    assert words.format(**places) in lines[-1], lines[-1]


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    for args, debug in [(["--lm", "/etc"], "1"), (["--lm", "/etc", "--debug"], None)]:
        p = run("train.py", args, tmp_path, debug)
        assert p.returncode != 0 and "Traceback" in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: /etc/config.json: not found")
