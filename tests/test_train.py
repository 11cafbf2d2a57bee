"""train.py end to end on tiny random backbones: a short run, exact resume, NaN stop, atomic checkpoints."""
import pytest
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import ROOT, coco_layout
import toy
from hub import load_adapter, save_adapter


def run_train(tiny_backbones, out_dir, *flags, modality="image", check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), f"--modality={modality}", f"--lm={tiny_backbones['lm']}",
           f"--encoder={tiny_backbones[modality]}", f"--out_dir={out_dir}", "--toy_train_samples=48",
           "--toy_eval_samples=8", "--batch_size=8", "--blind_control=False", "--max_new_tokens=4",
           "--log_interval=1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_short_run_writes_checkpoint_log_curves_and_scores(tiny_backbones, tmp_path):
    out = tmp_path / "run"
    p = run_train(tiny_backbones, out, "--max_iters=4", "--eval_interval=2")
    for name in ("ckpt.safetensors", "state.pt", "log.jsonl", "curves.png", "predictions.jsonl", "scores.json"):
        assert (out / name).exists(), name
    state, config = load_adapter(out / "ckpt.safetensors")
    assert config["modality"] == "image" and config["iter"] == 4
    # how it was evaluated, for sample.py and --eval_only: the toy preset's greedy decoding, the flags above
    assert [config[k] for k in ("num_beams", "max_new_tokens", "seed", "toy_eval_samples")] == [1, 4, 1337, 8]
    levels = toy.train_preset("image")["num_levels"]  # the toy preset: one connector per level
    assert set(state) == {"prompt"} | {f"connector.{k}.{w}" for k in range(levels) for w in ("weight", "bias")}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "val_loss" in r] == [2, 4]
    rates = [r for r in log if "loss" in r]
    assert len(rates) == 4 and all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in rates)
    assert "colour accuracy" in p.stdout and "CIDEr" in p.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert 0 <= scores["exact match"] <= 1
    (out / "scores.json").unlink()
    (out / "predictions.jsonl").unlink()
    p = run_train(tiny_backbones, out, "--eval_only")  # scores the checkpoint again, the same way
    assert json.loads((out / "scores.json").read_text()) == scores
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all({"id", "prediction", "references"} <= set(r) for r in preds)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_backbones, tmp_path):
    common = ["--eval_interval=2", "--lr_decay_iters=6", "--warmup_iters=2", "--eval_samples=2"]
    run_train(tiny_backbones, tmp_path / "straight", "--max_iters=6", *common)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=2", *common)
    half = load_file(tmp_path / "resumed" / "ckpt.safetensors")
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=6", "--init_from=resume", *common)
    straight = load_file(tmp_path / "straight" / "ckpt.safetensors")
    resumed = load_file(tmp_path / "resumed" / "ckpt.safetensors")
    assert not torch.equal(half["prompt"], resumed["prompt"])  # it did train after resuming
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=0, rtol=0)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_backbones, tmp_path):
    out = tmp_path / "nan"
    p = run_train(tiny_backbones, out, "--max_iters=6", "--eval_interval=1", "--lr=1e30", "--prompt_lr=1e30",
                  "--warmup_iters=0", "--grad_clip=0.0", check=False)
    assert p.returncode != 0
    assert "loss is" in p.stderr and "last good checkpoint" in p.stderr, p.stderr[-2000:]
    state, config = load_adapter(out / "ckpt.safetensors")
    assert config["iter"] >= 1 and all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(tiny_backbones, tmp_path):
    for flags, words in [(["--modality=smell"], "--modality smell: expected one of image, audio, video"),
                         (["--modality", "smell"], "--modality smell: expected one of"),
                         (["--batch_size=big"], "expected an integer"), (["--no_such_thing=1"], "unknown setting"),
                         (["--batch_size"], "--batch_size: missing value"),
                         (["--eval_only", "--out_dir", str(tmp_path / "none")], "--eval_only: no checkpoint at")]:
        p = run_train(tiny_backbones, tmp_path / "bad", *flags, check=False)
        assert p.returncode != 0 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_eval_only_takes_modality_task_and_data_set_from_the_checkpoint(tiny_backbones, tmp_path):
    out = tmp_path / "audio-run"
    run_train(tiny_backbones, out, "--max_iters=1", "--eval_interval=1", "--eval_samples=2", modality="audio")
    (out / "scores.json").unlink()
    # the space form, and a modality flag the checkpoint overrides (it was trained on audio)
    cmd = [sys.executable, str(ROOT / "train.py"), "--eval_only", "--modality", "image", "--out_dir", str(out),
           "--toy_eval_samples", "4", "--max_new_tokens", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4  # the toy world's audio captions, not its image captions
    assert all(any(w in r["references"][0] for w in ("beep", "chirp", "buzz")) for r in preds), preds
    assert (out / "scores.json").exists()


def test_curves_use_a_log_loss_axis_with_markers(tmp_path):
    """The audio run's shape: 1.48 -> 0.06 in the first 10% of iterations, then halving over the other 90%.
    On a linear axis that second half is a flat line on the floor (~7 px); on a log axis it is visible."""
    import math
    import plot
    rows = [{"iter": i, "loss": 1.48 * math.exp(-i * math.log(1.48 / 0.06) / 150) if i <= 150 else
             0.06 * 0.5 ** ((i - 150) / 1350)} for i in range(10, 1501, 10)]
    rows += [{"iter": i, "val_loss": 0.05} for i in (500, 1000, 1500)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    plot.plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    from PIL import Image
    img = Image.open(tmp_path / "curves.png").convert("RGB")
    pixels = img.load()
    def rows_of(colour, x):  # y coordinates of a colour in one pixel column
        return [y for y in range(img.height) if pixels[x, y] == colour]
    blue = (70, 130, 180)  # steelblue, the training line
    columns = [x for x in range(img.width) if rows_of(blue, x)]
    early, late = rows_of(blue, columns[0] + (columns[-1] - columns[0]) // 10), rows_of(blue, columns[-1])
    assert min(late) - max(early) > 40, (early, late)  # the last 90% spans more than 40 px
    orange = (255, 140, 0)
    assert sum(pixels[x, y] == orange for x in range(img.width) for y in range(img.height)) > 3 * 20  # 3 markers
    assert plot.nice_ticks(0.02, 2.2, log=True) == [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert plot.nice_ticks(0, 1500, log=False) == [0, 200, 400, 600, 800, 1000, 1200, 1400]


SAVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from hub import save_adapter
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.zeros(256, 1024))
m = M()
i = 0
while True:
    i += 1
    with torch.no_grad():
        m.prompt.fill_(i)
    save_adapter(m, sys.argv[2], {"epalm": {}, "iter": i})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_checkpoint_survives_a_kill_during_save(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    for attempt in range(4):
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(ROOT), str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip()  # at least one complete save
        time.sleep(0.05 * attempt)
        p.send_signal(signal.SIGKILL)
        p.wait()
        state, config = load_adapter(path)
        assert torch.all(state["prompt"] == config["iter"])  # a whole, consistent checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_backbones, tmp_path):
    """DDP with the gloo backend: both ranks train, rank 0 writes the checkpoint and the scores."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--modality=image", f"--lm={tiny_backbones['lm']}", f"--encoder={tiny_backbones['image']}",
           f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--toy_train_samples=32", "--toy_eval_samples=4",
           "--batch_size=4", "--blind_control=False", "--max_new_tokens=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    state, config = load_adapter(out / "ckpt.safetensors")
    assert config["iter"] == 2 and (out / "scores.json").exists()


@pytest.mark.slow
def test_a_real_data_set_layout_end_to_end_scores_the_whole_split(tiny_backbones, tmp_path):
    """COCO's Karpathy layout with real photos: train, then --eval_only with nothing but --out_dir scores every
    item of the split (no eval_samples cap) and says how many."""
    root = coco_layout(tmp_path / "coco")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "coco", "--data_dir", str(root), "--lm",
           tiny_backbones["lm"], "--encoder", tiny_backbones["image"], "--out_dir", str(out), "--max_iters", "2",
           "--batch_size", "2", "--num_levels", "2", "--num_workers", "0", "--max_new_tokens", "3",
           "--num_beams", "2", "--warmup_iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (out / "scores.json").unlink()
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval_only", "--out_dir", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["items"] == 3 and "CIDEr" in scores
    assert "held-out, val split" in p.stdout and "items scored" in p.stdout and " 3" in p.stdout
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_eval_only_takes_the_runs_evaluation_settings(tmp_path):
    """--eval_only rebuilds the toy held-out set from the run's seed and size, decodes and quantizes as the run
    did, unless told otherwise; a checkpoint from before these were recorded gets the toy preset's."""
    import train
    run = {"modality": "audio", "task": "caption", "dataset": "toy", "data_dir": "", "lm": "", "encoder": "",
           "epalm": {}}
    save_adapter(torch.nn.Linear(1, 1), tmp_path / "ckpt.safetensors",
                 {**run, "num_beams": 2, "max_new_tokens": 5, "seed": 7, "toy_eval_samples": 9})
    keys = ("modality", "num_beams", "max_new_tokens", "seed", "toy_eval_samples")
    s = train.configure(["--eval_only", "--out_dir", str(tmp_path)])
    assert [s[k] for k in keys] == ["audio", 2, 5, 7, 9]
    s = train.configure(["--eval_only", "--out_dir", str(tmp_path), "--toy_eval_samples", "3", "--num_beams", "1"])
    assert [s[k] for k in keys] == ["audio", 1, 5, 7, 3]
    save_adapter(torch.nn.Linear(1, 1), tmp_path / "ckpt.safetensors", run)
    s = train.configure(["--eval_only", "--out_dir", str(tmp_path)])
    assert [s[k] for k in keys] == ["audio", 1, 16, 1337, 300]
    assert s["quantize"] == "none"  # from before quantization: full precision
    # the frozen LM quantized as in training, unless told otherwise
    save_adapter(torch.nn.Linear(1, 1), tmp_path / "ckpt.safetensors",
                 {**run, "quantize": "int4", "quantize_group_size": 64, "quantize_encoder": True})
    keys = ("quantize", "quantize_group_size", "quantize_encoder")
    s = train.configure(["--eval_only", "--out_dir", str(tmp_path)])
    assert [s[k] for k in keys] == ["int4", 64, True]
    s = train.configure(["--eval_only", "--out_dir", str(tmp_path), "--quantize", "int8"])
    assert [s[k] for k in keys] == ["int8", 64, True]


def test_a_real_data_set_takes_its_modality_and_the_papers_backbones(tmp_path, capsys):
    import train
    for name, modality, encoder in [("coco", "image", "google/vit-base-patch16-224"),
                                    ("audiocaps", "audio", "MIT/ast-finetuned-audioset-10-10-0.4593"),
                                    ("msvd_qa", "video", "facebook/timesformer-base-finetuned-k400")]:
        s = train.configure(["--dataset", name, "--data_dir", str(tmp_path)])
        assert [s["modality"], s["lm"], s["encoder"]] == [modality, "facebook/opt-2.7b", encoder]
        assert capsys.readouterr().out == (f"{name}: the paper's backbones by default: --lm facebook/opt-2.7b, "
                                           f"--encoder {encoder}\n")
    s = train.configure(["--dataset", "coco", "--data_dir", str(tmp_path), "--lm", "my/lm"])
    assert s["lm"] == "my/lm" and s["task"] == "caption"
    assert capsys.readouterr().out == ("coco: the paper's backbones by default: "
                                       "--encoder google/vit-base-patch16-224\n")
    s = train.configure(["--dataset", "msvd_qa", "--data_dir", str(tmp_path), "--modality=video", "--task=vqa"])
    assert s["task"] == "vqa" and "msvd_qa: the paper's backbones" in capsys.readouterr().out  # agreeing is fine
    s = train.configure(["--modality", "audio"])  # the toy world keeps its toy backbones, silently
    assert s["lm"] == s["encoder"] == "" and capsys.readouterr().out == ""


def test_inject_input_says_which_settings_it_ignores(capsys):
    import train
    train.configure(["--inject", "input", "--num_levels", "3", "--shared_connector", "False"])
    assert capsys.readouterr().out == ("--inject=input puts the last level's token at the input, with one connector: "
                                       "--num_levels, --shared_connector ignored\n")
    train.configure(["--inject", "input"])  # the toy preset's num_levels is not the user's
    train.configure(["--num_levels", "2"])
    assert capsys.readouterr().out == ""


def test_num_workers_fit_the_cores():
    import train
    assert 0 <= train.num_workers <= len(os.sched_getaffinity(0))
