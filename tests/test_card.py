"""card.py and a run's folder as something to share: the model card a run writes (read back with huggingface_hub's
own parser and with PyYAML), --eval_only on a run served as a hub repository by test_hub's loopback fake hub, and
a run folder that samples in another clone of the project, also when it names its backbones by old absolute paths."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import card
import toy
from conftest import ROOT, TESTDATA
from hub import load_adapter
from model import EPALM, EPALMConfig, load_backbones
from test_hub import FakeHub

TRAIN_ARGS = ["--modality", "image", "--max_iters=2", "--toy_train_samples=16", "--toy_eval_samples=4",
              "--batch_size=4", "--eval_interval=2", "--max_new_tokens=3", "--blind_control=True", "--num_workers=0"]
PHOTO = TESTDATA / "images" / "hopper.jpg"


def clean_env(**env):
    """The caller's environment without any Hugging Face variable (never the user's cache or token), plus env."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    return {**keep, "OMP_NUM_THREADS": "1", **env}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A two-iteration run on the committed toy backbones, with its blind control: (its folder, its arguments)."""
    out = tmp_path_factory.mktemp("runs") / "image-caption"
    args = [*TRAIN_ARGS, f"--out_dir={out}"]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=clean_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return out, args


def sample(script_dir, checkpoint, cwd, **env):
    p = subprocess.run([sys.executable, str(script_dir / "sample.py"), "--image", str(PHOTO), "--checkpoint",
                        str(checkpoint), "--max_new_tokens", "4"], cwd=cwd, capture_output=True, text=True,
                       timeout=120, env=clean_env(**env))
    return p


@pytest.mark.slow
def test_a_run_writes_its_model_card(toy_run):
    out, args = toy_run
    results = json.loads((out / "results.json").read_text())
    scores, blind = results["scores"], results["blind"]
    state, config = load_adapter(out / "ckpt.safetensors")
    text = (out / "README.md").read_text()
    data = ModelCard(text).data  # the hub's own reader of the front matter
    assert data.library_name == "epalm" and {"epalm", "image", "captioning", "toy"} <= set(data.tags)
    assert data.base_model is None  # toy backbones are no hub models ...
    assert "# no base_model: toy/lm and toy/vit are not hub models" in text  # ... and the card says why
    got = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    assert got.keys() == set(scores) - {"items"} and got["CIDEr"] == ("cider", round(scores["CIDEr"], 4))
    assert got["colour accuracy"] == ("accuracy", round(scores["colour accuracy"], 4))
    assert set(data.metrics) == {"bleu", "cider", "exact_match", "accuracy"}
    assert {r.dataset_split for r in data.eval_results} == {"heldout"}
    body = text.split("\n---\n", 1)[1]
    trainable = sum(v.numel() for v in state.values())
    assert f"Only those train: {trainable:,} parameters" in body
    assert f"    python train.py {shlex.join(args)}\n" in body
    assert "    python sample.py --image FILE --checkpoint USER/NAME\n" in body
    assert f"| items scored | {scores['items']:,} | {blind['items']:,} |" in body
    assert f"| CIDEr | {scores['CIDEr']:.4f} | {blind['CIDEr']:.4f} |" in body
    assert f"Iterations: {config['iter']}." in body and "blind control" in body
    assert not (out / "README.md.tmp").exists()


@pytest.fixture(scope="module")
def toy_model():
    lm, _, encoder = load_backbones("image", "toy/lm", "toy/vit")
    torch.manual_seed(0)
    return EPALM(lm, encoder, EPALMConfig(num_levels=2, prompt_length=3))


def test_front_matter_of_hub_backbones_parses_as_expected(toy_model):
    config = {"modality": "image", "task": "vqa", "dataset": "vqav2", "lm": "facebook/opt-2.7b",
              "encoder": "google/vit-base-patch16-224", "epalm": toy_model.config.__dict__, "iter": 1200}
    scores = {"items": 3, "accuracy": 0.123456, "shape accuracy": 0.5}
    text = card.model_card(toy_model, config, ["--dataset=vqav2", "--data_dir", "/data/my vqa"], scores, None, "val")
    head, body = text.removeprefix("---\n").split("\n---\n", 1)
    assert yaml.safe_load(head) == {
        "library_name": "epalm", "tags": ["epalm", "eP-ALM", "image", "question-answering"],
        "base_model": ["facebook/opt-2.7b", "google/vit-base-patch16-224"], "base_model_relation": "adapter",
        "metrics": ["accuracy"],
        "model-index": [{"name": "epalm-image-vqa", "results": [{
            "task": {"type": "visual-question-answering"},
            "dataset": {"type": "vqav2", "name": "vqav2 val", "split": "val"},
            "metrics": [{"type": "accuracy", "name": "accuracy", "value": 0.1235},
                        {"type": "accuracy", "name": "shape accuracy", "value": 0.5}]}]}]}
    assert "python train.py --dataset=vqav2 --data_dir '/data/my vqa'" in body
    assert 'python sample.py --image FILE --question "what is in it?" --checkpoint USER/NAME' in body
    assert "[`facebook/opt-2.7b`](https://huggingface.co/facebook/opt-2.7b)" in body
    assert "| items scored | 3 |" in body and "| accuracy | 0.1235 |" in body and "blind" not in body


def test_a_first_card_has_no_scores(toy_model, tmp_path):
    config = {"modality": "image", "task": "caption", "dataset": "toy", "lm": "toy/lm", "encoder": "toy/vit",
              "epalm": toy_model.config.__dict__, "iter": 2}
    card.write_card(tmp_path, card.model_card(toy_model, config, ["--modality", "image"]))
    text = (tmp_path / "README.md").read_text()
    head = yaml.safe_load(text.removeprefix("---\n").split("\n---\n", 1)[0])
    assert set(head) == {"library_name", "tags"} and "Not scored yet" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.slow
def test_eval_only_scores_a_run_served_as_a_hub_repository(toy_run, tmp_path):
    out, _ = toy_run
    repo = tmp_path / "repos" / "me" / "toy-image"
    repo.mkdir(parents=True)
    for name in ("ckpt.safetensors", "README.md"):
        shutil.copy(out / name, repo / name)
    fake = FakeHub(tmp_path / "repos")
    try:
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval_only", "--out_dir", "me/toy-image",
                            "--toy_eval_samples=4", "--max_new_tokens=3", "--num_workers=0"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env=clean_env(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf")))
    finally:
        fake.close()
    assert p.returncode == 0, p.stderr[-3000:]
    scored = tmp_path / "out" / "me" / "toy-image"
    assert (scored / "ckpt.safetensors").read_bytes() == (out / "ckpt.safetensors").read_bytes()
    assert json.loads((scored / "scores.json").read_text()) == json.loads((out / "scores.json").read_text())
    assert (scored / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    assert list((tmp_path / "hf" / "hub").glob("models--me--toy-image/snapshots/*/ckpt.safetensors"))


@pytest.mark.slow
def test_a_run_folder_samples_in_another_clone(toy_run, tmp_path):
    """The run folder and a copy of the project (its .py files and toy/) both moved elsewhere: the checkpoint names
    its backbones toy/lm and toy/vit, found in the clone that samples; older checkpoints, which named them by
    absolute path into the clone that trained them, load too once that folder is gone."""
    out, _ = toy_run
    clone = tmp_path / "elsewhere" / "epalm"
    clone.mkdir(parents=True)
    for f in ROOT.glob("*.py"):
        shutil.copy(f, clone / f.name)
    shutil.copytree(toy.TOY_DIR, clone / "toy")
    run = shutil.copytree(out, tmp_path / "shared-run", ignore=shutil.ignore_patterns("blind", "state.pt"))
    here = sample(ROOT, out, cwd=ROOT)
    assert here.returncode == 0, here.stderr[-2000:]
    there = sample(clone, run, cwd=tmp_path)
    assert there.returncode == 0, there.stderr[-2000:]
    assert there.stdout == here.stdout and here.stdout.startswith(f"{PHOTO}: ")
    state, config = load_adapter(run / "ckpt.safetensors")
    assert (config["lm"], config["encoder"]) == ("toy/lm", "toy/vit")
    old = {**config, "lm": "/home/me/old-clone/toy/lm", "encoder": "/home/me/old-clone/toy/vit"}
    save_file(state, run / "ckpt.safetensors", metadata={"config": json.dumps(old)})
    old_style = sample(clone, run, cwd=tmp_path)
    assert old_style.returncode == 0 and old_style.stdout == here.stdout, old_style.stderr[-2000:]
