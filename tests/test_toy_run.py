"""The main job in miniature: a CI-sized `python train.py --modality=X` on the committed toy backbones must beat
its blind control (same recipe, media blanked) on held-out attribute combinations."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_short_run_beats_its_blind_control_on_heldout_combinations(tmp_path, modality):
    # the brief's own form, `--modality audio`, and the `--key=value` form side by side
    cmd = [sys.executable, str(ROOT / "train.py"), "--modality", modality, "--max_iters=200",
           "--toy_train_samples=800", "--toy_eval_samples=60", "--eval_interval=200", "--blind_control=True",
           f"--out_dir={tmp_path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    ours, blind = results["scores"], results["blind"]
    assert ours["attribute accuracy"] > 0.6, ours
    assert ours["attribute accuracy"] > blind["attribute accuracy"] + 0.3, (ours, blind)
    assert "attribute accuracy" in p.stdout and "blind" in p.stdout
