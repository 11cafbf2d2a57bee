"""A run is a pure function of its seed and survives being stopped: augmented batches resume exactly (with loader
workers or without), a blind control left unstarted or half done resumes, float16 trains with loss scaling and
resumes exactly, and a scheduler's SIGTERM costs at most one step."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from hub import load_adapter
from test_train import run_train

AUGMENTED = ["--augment=True", "--cache_features=False", "--eval_interval=3", "--lr_decay_iters=6",
             "--warmup_iters=2", "--eval_samples=2", "--lr=1e-2", "--prompt_lr=1e-2"]


def assert_same_adapter(a, b):
    a, b = load_file(a / "ckpt.safetensors"), load_file(b / "ckpt.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_an_augmented_run_resumed_equals_the_uninterrupted_run(tiny_backbones, tmp_path, modality):
    """Random crops and flips (image) and SpecAugment (audio) are drawn per (seed, epoch, example): the resumed
    run, here with two loader workers, sees the augmentations the straight run (no workers) saw."""
    run_train(tiny_backbones, tmp_path / "straight", "--max_iters=6", "--num_workers=0", *AUGMENTED,
              modality=modality)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=3", "--num_workers=2", *AUGMENTED,
              modality=modality)
    half = load_file(tmp_path / "resumed" / "ckpt.safetensors")
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=6", "--init_from=resume", "--num_workers=2",
              *AUGMENTED, modality=modality)
    assert not torch.equal(half["prompt"], load_file(tmp_path / "resumed" / "ckpt.safetensors")["prompt"])
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    # the augmentation did something: without it the same recipe ends elsewhere
    run_train(tiny_backbones, tmp_path / "plain", "--max_iters=6", "--num_workers=0", *AUGMENTED, "--augment=False",
              modality=modality)
    plain = load_file(tmp_path / "plain" / "ckpt.safetensors")
    assert not torch.equal(plain["prompt"], load_file(tmp_path / "straight" / "ckpt.safetensors")["prompt"])


@pytest.mark.slow
def test_resume_trains_a_blind_control_that_had_not_started(tiny_backbones, tmp_path):
    """The main run finished, the job stopped before its blind control: resuming scores the main run, trains the
    control from scratch and writes results.json with both."""
    out = tmp_path / "run"
    flags = ["--max_iters=2", "--eval_interval=2", "--eval_samples=2"]
    run_train(tiny_backbones, out, *flags)  # run_train turns the control off
    assert not (out / "results.json").exists() or json.loads((out / "results.json").read_text())["blind"] is None
    run_train(tiny_backbones, out, *flags, "--init_from=resume", "--blind_control=True")
    results = json.loads((out / "results.json").read_text())
    assert results["blind"]["items"] == 2 and results["scores"]["items"] == 2
    assert (out / "blind" / "ckpt.safetensors").exists()


@pytest.mark.slow
def test_float16_scales_the_loss_trains_and_resumes_exactly(tiny_backbones, tmp_path):
    """fp16 autocast runs on the CPU too: the losses stay finite and fall, the scaler's state is in state.pt, and
    3 + 3 iterations equal 6."""
    common = ["--dtype=float16", "--eval_interval=3", "--lr_decay_iters=6", "--warmup_iters=1", "--eval_samples=2",
              "--lr=1e-2", "--prompt_lr=1e-2"]
    run_train(tiny_backbones, tmp_path / "straight", "--max_iters=6", *common)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
              if "\"loss\"" in x]
    assert len(losses) == 6 and all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    assert losses[-1] < losses[0], losses
    state = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # the loss was scaled (2**16 to start with)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=3", *common)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=6", "--init_from=resume", *common)
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")


def test_float16_gradients_underflow_without_the_scaler(tiny_backbones):
    """Why the scaler: gradients below float16's smallest subnormal (6e-8) become zero on their way back through
    float16 activations; scaled by 2**16 first, they survive and unscale to their true values."""
    from model import EPALM, EPALMConfig, load_backbones
    lm, tokenizer, encoder = load_backbones("image", tiny_backbones["lm"], tiny_backbones["image"])
    torch.manual_seed(0)
    model = EPALM(lm, encoder, EPALMConfig(num_levels=2, inject_start=1, inject_end=3, prompt_length=2))
    ids = torch.randint(4, 1000, (2, 6))
    media = torch.randn(2, 3, 32, 32)

    def prompt_grad(scaler):
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.0)
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(media, ids, torch.ones_like(ids), ids)
        scaler.scale(loss * 2.0 ** -30).backward()  # a small loss, as late in training or with many tokens
        scaler.unscale_(optimizer)
        return model.prompt.grad.clone()

    without = prompt_grad(torch.amp.GradScaler("cpu", enabled=False))
    scaled = prompt_grad(torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    assert (without == 0).float().mean() > 0.9  # nearly everything underflowed
    assert (scaled != 0).float().mean() > 0.9


@pytest.mark.slow
def test_sigterm_checkpoints_after_the_current_step_and_resume_is_exact(tiny_backbones, tmp_path):
    """A scheduler's SIGTERM mid-run: the step finishes, the checkpoint is written, the exit status is 128 + 15;
    --init_from resume then ends where the uninterrupted run ends, bit for bit."""
    flags = ["--max_iters=40", "--eval_interval=40", "--eval_samples=2", "--lr_decay_iters=40", "--warmup_iters=2"]
    run_train(tiny_backbones, tmp_path / "straight", *flags)
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(ROOT / "train.py"), "--modality=image", f"--lm={tiny_backbones['lm']}",
           f"--encoder={tiny_backbones['image']}", f"--out_dir={out}", "--toy_train_samples=48",
           "--toy_eval_samples=8", "--batch_size=8", "--blind_control=False", "--max_new_tokens=4",
           "--log_interval=1", *flags]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "--init_from resume" in stdout, stdout
    it = torch.load(out / "state.pt", weights_only=True)["iter"]
    assert 3 <= it < 40
    run_train(tiny_backbones, out, *flags, "--init_from=resume")
    assert_same_adapter(tmp_path / "straight", out)


@pytest.mark.slow
def test_a_quantized_run_resumes_exactly_and_is_scored_as_trained(tiny_backbones, tmp_path):
    """--quantize int8: the checkpoint records it, 2 + 2 iterations equal 4, --eval_only rebuilds the same
    quantized LM (the same scores), and resuming without the setting is refused."""
    common = ["--quantize=int8", "--eval_interval=2", "--lr_decay_iters=4", "--warmup_iters=1", "--eval_samples=2",
              "--lr=1e-2", "--prompt_lr=1e-2"]
    run_train(tiny_backbones, tmp_path / "straight", "--max_iters=4", *common)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=2", *common)
    run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=4", "--init_from=resume", *common)
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    _, config = load_adapter(tmp_path / "straight" / "ckpt.safetensors")
    assert (config["quantize"], config["quantize_encoder"]) == ("int8", False)
    scores = json.loads((tmp_path / "straight" / "scores.json").read_text())
    (tmp_path / "straight" / "scores.json").unlink()
    run_train(tiny_backbones, tmp_path / "straight", "--eval_only", "--eval_samples=2")  # its quantization
    assert json.loads((tmp_path / "straight" / "scores.json").read_text()) == scores
    p = run_train(tiny_backbones, tmp_path / "resumed", "--max_iters=6", "--init_from=resume", check=False)
    assert p.returncode != 0
    assert "was trained with --quantize int8, this run has --quantize none" in p.stderr.strip().splitlines()[-1]
