"""evaluate.py: held-out evaluation through the training data path, and its failure rule."""
import pytest
import os
import subprocess
import sys

from conftest import ROOT, coco_layout


@pytest.mark.slow
def test_evaluation_stops_when_more_than_one_percent_fails_to_decode(tiny_backbones, tmp_path):
    """The rule training has (more than 1% undecodable, counted over at least 100 items, stops the run) holds
    for evaluation too: 2 of 3 held-out photos broken is a wrong data set, not bad luck."""
    root = coco_layout(tmp_path / "coco", n_train=2, n_val=3)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "coco", "--data_dir", str(root), "--lm",
           tiny_backbones["lm"], "--encoder", tiny_backbones["image"], "--out_dir", str(out), "--max_iters", "1",
           "--batch_size", "1", "--num_levels", "2", "--num_workers", "0", "--max_new_tokens", "2",
           "--num_beams", "1", "--warmup_iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env).returncode == 0
    eval_only = [sys.executable, str(ROOT / "train.py"), "--eval_only", "--out_dir", str(out), "--batch_size", "1",
                 "--max_new_tokens", "2", "--num_beams", "1"]
    held_out = sorted(f for f in (root / "val2014").iterdir() if f.name[0] in "234")  # the 3 val photos
    held_out[0].write_bytes(b"not a jpeg")  # one bad file of 3: below the rule's floor of 1 in 100
    p = subprocess.run(eval_only, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    held_out[1].write_bytes(b"not a jpeg either")
    p = subprocess.run(eval_only, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("error: more than 1% of the held-out media failed to decode "
                                                        "(2 of 3)"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
