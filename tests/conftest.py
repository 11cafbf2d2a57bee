"""Shared test setup: the project root on sys.path, small thread count, paths to tests/data."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TESTDATA = ROOT / "tests" / "data"  # real files kept in the repository (tests/data/SOURCES.md)
torch.set_num_threads(min(2, os.cpu_count() or 1))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker (and for what it launches),
    torch.set_num_threads(1)               # so that two workers share two cores instead of fighting over them
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """Random tiny OPT (with the real OPT tokenizer files), ViT, AST and TimeSformer in the hub layout,
    written by transformers' save_pretrained: {"lm": path, "image": path, "audio": path, "video": path}."""
    import transformers
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    lm = transformers.OPTConfig(vocab_size=50272, hidden_size=16, num_hidden_layers=4, ffn_dim=32,
                                num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(lm).save_pretrained(root / "lm")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TESTDATA / "tokenizer" / "opt" / name, root / "lm" / name)
    common = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **common),
                          add_pooling_layer=False).save_pretrained(root / "image")
    transformers.ASTModel(transformers.ASTConfig(max_length=64, num_mel_bins=128, **common)).save_pretrained(
        root / "audio")
    transformers.TimesformerModel(transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=4,
                                                                 **common)).save_pretrained(root / "video")
    return {k: str(root / k) for k in ("lm", "image", "audio", "video")}


def coco_layout(root, n_train: int = 5, n_val: int = 3):
    """COCO's Karpathy layout (dataset_coco.json + val2014/) holding copies of the real test photos."""
    import json
    (root / "val2014").mkdir(parents=True)
    photos = ["hopper.jpg", "hopper_gray.jpg", "COCO_val2014_000000262148.jpg", "pil123rgba.png"]
    images = []
    for i in range(n_train + n_val):
        name = f"{i}_{photos[i % len(photos)]}"
        shutil.copy(TESTDATA / "images" / photos[i % len(photos)], root / "val2014" / name)
        images.append({"cocoid": i, "filepath": "val2014", "filename": name, "split": "val" if i >= n_train else
                       "train", "sentences": [{"raw": f"a photo number {i}"}, {"raw": "a picture"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, launches torchrun or runs real shapes (seconds to minutes); "
                                       "`-m \"not slow\"` is the inner loop")
