"""sample.py as a user runs it: real image, wav and mp4 files, a checkpoint (a run folder or an adapter shared on
the hub), bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TESTDATA
from hub import load_adapter, save_adapter
from model import EPALM, EPALMConfig, load_backbones

FILES = {"image": [TESTDATA / "images" / "hopper.jpg", TESTDATA / "images" / "pil123rgba.png"],
         "audio": [TESTDATA / "audio" / "speech_16k_mono.wav", TESTDATA / "audio" / "tone_48k_mono.wav"],
         "video": [TESTDATA / "video" / "short_32frames.mp4"]}


def make_checkpoint(tiny_backbones, modality, path, task="caption", **evaluated):
    torch.manual_seed(0)
    lm, _, encoder = load_backbones(modality, tiny_backbones["lm"], tiny_backbones[modality])
    config = EPALMConfig(num_levels=2, prompt_length=3)
    model = EPALM(lm, encoder, config)
    save_adapter(model, path, {"modality": modality, "task": task, "lm": tiny_backbones["lm"],
                               "encoder": tiny_backbones[modality], "epalm": config.__dict__, **evaluated})
    return path


def run_sample(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_one_line_per_input(tiny_backbones, tmp_path, modality):
    ckpt = make_checkpoint(tiny_backbones, modality, tmp_path / "ckpt.safetensors")
    p = run_sample(f"--{modality}", *FILES[modality], "--checkpoint", tmp_path, "--max_new_tokens", 3)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(f) for f in FILES[modality]]
    p = run_sample(f"--{modality}", FILES[modality][0], "--checkpoint", ckpt, "--question", "what is it?",
                   "--num_beams", 2, "--max_new_tokens", 3)
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 1, p.stderr[-2000:]


@pytest.mark.slow
def test_bfloat16_weights(tiny_backbones, tmp_path):
    """--dtype bfloat16 (the default on CUDA) loads the frozen backbones in bf16 and generates under autocast."""
    ckpt = make_checkpoint(tiny_backbones, "image", tmp_path / "ckpt.safetensors")
    p = run_sample("--image", *FILES["image"], "--checkpoint", ckpt, "--dtype", "bfloat16", "--num_beams", 2,
                   "--max_new_tokens", 3)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [line.split(": ")[0] for line in p.stdout.strip().splitlines()] == [str(f) for f in FILES["image"]]
    p = run_sample("--image", FILES["image"][0], "--checkpoint", ckpt, "--dtype", "float8")
    assert p.returncode == 1 and "--dtype float8: expected float32, bfloat16 or float16" in p.stderr


@pytest.mark.slow
def test_bad_input_is_a_one_line_error(tiny_backbones, tmp_path):
    ckpt = make_checkpoint(tiny_backbones, "image", tmp_path / "ckpt.safetensors")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((TESTDATA / "images" / "hopper.jpg").read_bytes()[:200])
    cases = [(["--image", tmp_path / "missing.jpg", "--checkpoint", ckpt], "missing.jpg"),
             (["--image", broken, "--checkpoint", ckpt], "broken.jpg"),
             (["--audio", FILES["audio"][0], "--checkpoint", ckpt], "trained on image"),
             (["--image", FILES["image"][0], "--checkpoint", tmp_path / "nothing"], "no checkpoint"),
             (["--image", FILES["image"][0], "--checkpoint", broken], "broken.jpg"),
             (["--image", FILES["image"][0], "--audio", FILES["audio"][0]], "exactly one modality"),
             (["--image", FILES["image"][0], "--num_beams"], "--num_beams: missing value")]
    for args, words in cases:
        p = run_sample(*args)
        assert p.returncode == 1, p.stderr
        assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_default_checkpoint_missing_says_how_to_train(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--video", str(FILES["video"][0])],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert p.returncode == 1 and "python train.py --modality video" in p.stderr, p.stderr


@pytest.mark.slow
def test_a_text_file_given_as_audio_says_what_is_read(tiny_backbones, tmp_path):
    ckpt = make_checkpoint(tiny_backbones, "audio", tmp_path / "ckpt.safetensors")
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    p = run_sample("--audio", passwd, "--checkpoint", ckpt)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: {passwd}: not a WAV file, and its name has no suffix naming an audio format "
                               "epalm reads: .wav .flac"), p.stderr


# ---- an adapter shared on the hub (test_hub's loopback fake hub), and where checkpoints are looked for

def run_sample_as_a_user(*args, **env):
    """sample.py with exactly env's Hugging Face variables (never the caller's cache or token)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and
             "proxy" not in k.lower()}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**clean, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_an_adapter_on_the_hub_gives_the_local_folders_captions(tiny_backbones, tmp_path):
    from test_hub import FakeHub
    run = tmp_path / "runs" / "image-caption"
    run.mkdir(parents=True)
    make_checkpoint(tiny_backbones, "image", run / "ckpt.safetensors")
    repos = tmp_path / "repos"
    (repos / "me" / "captioner").mkdir(parents=True)
    (repos / "me" / "captioner" / "ckpt.safetensors").write_bytes((run / "ckpt.safetensors").read_bytes())
    (repos / "me" / "no-ckpt").mkdir(parents=True)
    (repos / "me" / "no-ckpt" / "README.md").write_text("an adapter repository without its adapter\n")
    lost = make_checkpoint(tiny_backbones, "image", tmp_path / "lost.safetensors")
    lost_state, lost_config = load_adapter(lost)
    (repos / "me" / "lost").mkdir(parents=True)
    save_file(lost_state, repos / "me" / "lost" / "ckpt.safetensors",
              metadata={"config": json.dumps({**lost_config, "lm": str(tmp_path / "gone" / "lm")})})
    args = ["--image", *FILES["image"], "--max_new_tokens", 4]
    local = run_sample(*args, "--checkpoint", run)
    assert local.returncode == 0, local.stderr[-2000:]
    fake = FakeHub(repos)
    env = dict(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"))
    try:
        shared = run_sample_as_a_user(*args, "--checkpoint", "me/captioner", **env)
        assert shared.returncode == 0, shared.stderr[-2000:]
        assert shared.stdout == local.stdout and len(local.stdout.splitlines()) == 2
        fake.requests.clear()
        offline = run_sample_as_a_user(*args, "--checkpoint", "me/captioner", HF_HUB_OFFLINE="1", **env)
        assert offline.stdout == local.stdout and fake.requests == [], offline.stderr[-2000:]
        for repo, words in [("me/no-ckpt", "error: me/no-ckpt/ckpt.safetensors: not on the hub"),
                            ("me/nothing", "error: me/nothing: no such folder, nor a repository on the hub"),
                            ("me/lost", f"error: me/lost: the backbones it names do not load: {tmp_path / 'gone'}")]:
            p = run_sample_as_a_user(*args, "--checkpoint", repo, **env)
            assert p.returncode == 1 and p.stderr.startswith(words), p.stderr
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    finally:
        fake.close()


def test_a_folder_without_a_checkpoint_says_so(tmp_path):
    p = run_sample("--image", FILES["image"][0], "--checkpoint", tmp_path)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.strip() == f"error: {tmp_path}: no ckpt.safetensors in this folder (not a training run's out_dir?)"


@pytest.mark.slow
def test_decoding_follows_the_checkpoint_unless_given(tiny_backbones, tmp_path):
    """sample.py decodes as train.py evaluated the checkpoint (its num_beams, max_new_tokens); a checkpoint from
    before they were recorded: greedy, 30 tokens; flags win."""
    new = make_checkpoint(tiny_backbones, "image", tmp_path / "new.safetensors", num_beams=2, max_new_tokens=2)
    old = make_checkpoint(tiny_backbones, "image", tmp_path / "old.safetensors")  # the same weights (seed 0)
    out = {name: run_sample("--image", *FILES["image"], "--checkpoint", ckpt, *flags) for name, ckpt, flags in [
        ("new", new, []), ("new 2 beams 2 tokens", new, ["--num_beams", 2, "--max_new_tokens", 2]),
        ("old", old, []), ("new greedy 30 tokens", new, ["--num_beams", 1, "--max_new_tokens", 30])]}
    assert all(p.returncode == 0 for p in out.values()), [p.stderr[-2000:] for p in out.values()]
    assert out["new"].stdout == out["new 2 beams 2 tokens"].stdout
    assert out["old"].stdout == out["new greedy 30 tokens"].stdout != out["new"].stdout


@pytest.mark.slow
def test_a_vqa_checkpoint_asks_for_a_question(tiny_backbones, tmp_path):
    ckpt = make_checkpoint(tiny_backbones, "image", tmp_path / "ckpt.safetensors", task="vqa")
    p = run_sample("--image", FILES["image"][0], "--checkpoint", ckpt)
    assert p.returncode == 1 and p.stderr == f"error: {ckpt} was trained to answer questions (VQA): ask one with " \
                                             "--question\n", p.stderr
    p = run_sample("--image", FILES["image"][0], "--checkpoint", ckpt, "--question", "what colour?",
                   "--max_new_tokens", 2)
    assert p.returncode == 0 and p.stdout.startswith(f"{FILES['image'][0]}: "), p.stderr[-2000:]
