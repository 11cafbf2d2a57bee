"""The main job in miniature: a CI-sized `python train.py --modality=X` on the committed toy backbones must beat
its blind control (same recipe, media blanked) on held-out attribute combinations."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

MODALITIES = ["image", "audio", "video"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The three modalities' runs, started together: each is one thread, so on a 2-core CI machine they overlap
    instead of leaving a core idle. Returns modality -> (its process's outcome, its output folder)."""
    started = {}
    for modality in MODALITIES:
        out = tmp_path_factory.mktemp(f"toy-{modality}")
        # the brief's own form, `--modality audio`, and the `--key=value` form side by side
        cmd = [sys.executable, str(ROOT / "train.py"), "--modality", modality, "--max_iters=200",
               "--toy_train_samples=800", "--toy_eval_samples=60", "--eval_interval=200", "--blind_control=True",
               f"--out_dir={out}"]
        started[modality] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}), out)
    runs = {}
    try:
        for modality, (process, out) in started.items():
            stdout, stderr = process.communicate(timeout=900)
            runs[modality] = (process.returncode, stdout, stderr, out)
    finally:  # a run that hangs fails its test, and leaves no process behind
        for process, _ in started.values():
            process.kill()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_short_run_beats_its_blind_control_on_heldout_combinations(toy_runs, modality):
    returncode, stdout, stderr, out = toy_runs[modality]
    assert returncode == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    ours, blind = results["scores"], results["blind"]
    assert ours["attribute accuracy"] > 0.6, ours
    assert ours["attribute accuracy"] > blind["attribute accuracy"] + 0.3, (ours, blind)
    assert "attribute accuracy" in stdout and "blind" in stdout
