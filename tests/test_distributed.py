"""train.py under torchrun on CPU (gloo, two processes): evaluation and feature caching share the work and give
what one process gives; --fsdp trains like DDP with about half the frozen weights on each process."""
import pytest
import json
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, TESTDATA, coco_layout

COMMON = ["--toy_train_samples=32", "--toy_eval_samples=10", "--batch_size=4", "--blind_control=False",
          "--max_new_tokens=4", "--log_interval=1"]


def run(tiny_backbones, out_dir, *flags, procs=1, modality="image", lm=None):
    # --standalone: a free port for each launch, so two launches at once (pytest -n 2) do not collide
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={procs}"]
    cmd = [*launcher, str(ROOT / "train.py"), f"--modality={modality}", f"--lm={lm or tiny_backbones['lm']}",
           f"--encoder={tiny_backbones[modality]}", f"--out_dir={out_dir}", *COMMON, *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def lines(path):
    return path.read_text().splitlines()


@pytest.mark.slow
def test_evaluation_is_shared_and_equals_one_process(tiny_backbones, tmp_path):
    """10 items in batches of 4: rank 0 generates batches 0 and 2, rank 1 batch 1; rank 0 gathers and writes."""
    run(tiny_backbones, tmp_path / "one", "--max_iters=2", "--eval_interval=2", "--cache_features=False")
    first = lines(tmp_path / "one" / "predictions.jsonl")
    assert len(first) == 10
    scores = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert scores["items"] == 10
    for procs, extra in [(1, []), (2, []), (2, ["--fsdp"])]:
        (tmp_path / "one" / "predictions.jsonl").unlink()
        p = run(tiny_backbones, tmp_path / "one", "--eval_only", *extra, procs=procs)
        assert lines(tmp_path / "one" / "predictions.jsonl") == first, (procs, extra)
        assert json.loads((tmp_path / "one" / "scores.json").read_text()) == scores
        assert re.search(r"items scored\s+10\b", p.stdout), p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_fsdp_trains_like_ddp_with_half_the_frozen_weights_per_process(tiny_backbones, tmp_path, lm):
    # the toy Llama (rotary, grouped-query attention, tied head) is sharded one unit per layer like OPT
    flags = ["--max_iters=3", "--eval_interval=3", "--cache_features=False", "--lr=1e-2", "--prompt_lr=1e-2",
             "--warmup_iters=1"]
    if lm == "llama":  # without loader workers: 1 run in 7 aborted at exit (a worker shut down during teardown)
        flags, lm = [*flags, "--num_workers=0"], str(ROOT / "toy" / "llama")
    else:
        lm = None
    run(tiny_backbones, tmp_path / "ddp", *flags, procs=2, lm=lm)
    p = run(tiny_backbones, tmp_path / "fsdp", *flags, "--fsdp", procs=2, lm=lm)
    logs = {k: [json.loads(x) for x in lines(tmp_path / k / "log.jsonl")] for k in ("ddp", "fsdp")}
    for key in ("loss", "val_loss"):
        a = [r[key] for r in logs["ddp"] if key in r]
        b = [r[key] for r in logs["fsdp"] if key in r]
        assert len(a) == len(b) > 0 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (key, a, b)
    ddp, fsdp = (load_file(tmp_path / k / "ckpt.safetensors") for k in ("ddp", "fsdp"))
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], atol=1e-5, rtol=0)
    mine, whole = map(float, re.search(r"frozen weights ([\d.,]+) MiB on this process, ([\d.,]+) MiB in all",
                                       p.stdout).groups())
    assert 0.45 < mine / whole < 0.55, p.stdout  # each process holds half of every sharded weight
    # the adaptation-only checkpoint loads on one device, without FSDP, and sample.py captions with it
    from checkpoint import load_model
    model, _, config = load_model(tmp_path / "fsdp" / "ckpt.safetensors")
    assert config["iter"] == 3 and torch.equal(model.prompt.detach(), fsdp["prompt"])
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", str(TESTDATA / "images" / "hopper.jpg"),
                        "--checkpoint", str(tmp_path / "fsdp"), "--max_new_tokens", "3"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.startswith(f"{TESTDATA / 'images' / 'hopper.jpg'}: "), p.stderr


@pytest.mark.slow
def test_feature_cache_is_shared_and_equals_one_process(tiny_backbones, tmp_path):
    """Each process encodes its batches; the file of each split is written once, byte for byte the one a single
    process writes (same batches, so bit-identical features)."""
    flags = ["--max_iters=1", "--eval_interval=1", "--cache_features=True", "--eval_samples=4"]
    run(tiny_backbones, tmp_path / "a" / "run", *flags)
    run(tiny_backbones, tmp_path / "b" / "run", *flags, procs=2)
    one, two = (sorted((tmp_path / d / "cache").iterdir()) for d in ("a", "b"))
    assert len(one) == 2 and [f.name for f in one] == [f.name for f in two]  # the train and held-out splits
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    # a second run finds the cache: no encoding
    p = run(tiny_backbones, tmp_path / "b" / "run", *flags, procs=2)
    assert "encoding media" not in p.stderr


def test_each_process_takes_every_world_th_batch(monkeypatch):
    """The split itself: 5 batches over 2 processes are 0, 2, 4 and 1, 3; under FSDP the second process adds a
    repeat (None) so that both run three forwards."""
    import distributed
    for rank, fsdp, want in [(0, False, [0, 2, 4]), (1, False, [1, 3]), (1, True, [1, 3, None]), (0, True, [0, 2, 4])]:
        monkeypatch.setattr(distributed, "rank_and_world", lambda: (rank, 2))
        assert distributed.my_batches(5, fsdp) == want


@pytest.mark.slow
def test_fsdp_evaluation_survives_a_batch_with_nothing_decodable(tiny_backbones, tmp_path):
    """Under FSDP every process takes part in every forward: the process whose batch holds only a broken image
    runs on another batch (results dropped) instead of leaving the other waiting."""
    root = coco_layout(tmp_path / "coco", n_train=2, n_val=3)
    broken = root / "val2014" / "3_pil123rgba.png"  # the second held-out batch: rank 1's
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    flags = ["--dataset=coco", f"--data_dir={root}", "--batch_size=1", "--num_levels=2", "--num_workers=0",
             "--max_new_tokens=2", "--num_beams=1", "--max_iters=1", "--warmup_iters=1"]
    cmd = [sys.executable, str(ROOT / "train.py"), f"--lm={tiny_backbones['lm']}",
           f"--encoder={tiny_backbones['image']}", f"--out_dir={out}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env).returncode == 0
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), "--eval_only", "--fsdp", f"--out_dir={out}", "--batch_size=1",
                        "--max_new_tokens=2", "--num_beams=1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(lines(out / "predictions.jsonl")) == 2 and json.loads((out / "scores.json").read_text())["items"] == 2
    assert p.stderr.count(f"warning: skipped {broken}") == 1
