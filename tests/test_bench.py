"""bench.py --tiny as a smoke test: every section of the JSON it writes is there with finite positive numbers, and
the figures that are not timings (outputs against transformers', FLOP counts, gradients) are checked for real."""
import json
import math
import subprocess
import sys

import pytest
import torch

import bench
from conftest import ROOT


def numbers(tree, path=""):
    """Every number in a nested JSON tree with its path (bools are flags, not numbers)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--tiny", "--threads", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train step" in run.stdout and "generate" in run.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_section_has_finite_positive_timings(results):
    for section in ("matmul", "backbones", "train_step", "generate", "memory"):
        assert results[section], section
    assert set(results["backbones"]) == {"opt-tiny", "llama-tiny", "vit-tiny", "ast-tiny", "timesformer-tiny"}
    assert set(results["train_step"]) == {"image", "audio"}
    assert set(results["generate"]) == {"tiny greedy", "tiny beam3", "small greedy", "small beam3",
                                        "llama-tiny greedy", "llama-tiny beam3"}
    assert results["backbones"]["llama-tiny"]["train_speedup"] > 0  # the Llama row has forward+backward too
    zero_allowed = ("max_abs_diff", "frozen_params_with_grad", "step_extra_bytes", "levels", "inject")
    for path, value in numbers(results):
        assert math.isfinite(value), path
        if not any(z in path for z in zero_allowed):
            assert value > 0, path
    for name in ("plain", "cached", "cached_noprompt"):
        for modality in ("image", "audio"):
            v = results["train_step"][modality][name]
            assert v["s"] > 0 and 0 < v["mfu"] and v["tflop"] > 0, (modality, name)
    assert results["notes"], "skipped variants must be explained"


@pytest.mark.slow
def test_late_injection_without_prompt_keeps_least_for_the_backward_pass(results):
    # the paper's efficiency argument: with the prompt off, autograd records nothing below the window
    for modality in ("image", "audio"):
        row = results["train_step"][modality]
        late, prefix = row["cached_noprompt"]["saved_mib"], row["cached_input_prefix"]["saved_mib"]
        assert 0 < late < row["cached"]["saved_mib"] and late < prefix, modality
        assert row["saved_input_prefix_vs_noprompt"] == pytest.approx(prefix / late)


@pytest.mark.slow
def test_same_outputs_as_transformers(results):
    # both sides ran the same weights on the same inputs: the timings compare like with like
    for name, row in results["backbones"].items():
        assert row["max_abs_diff"] < 1e-3, name
    for name, row in results["generate"].items():
        assert row["same_tokens"] is True and row["new_tokens"] == 4, name


@pytest.mark.slow
def test_generation_rows_say_the_ratio_of_each_lm_family(results):
    rows = results["generate"]
    assert {name: row["family"] for name, row in rows.items()} == {
        "tiny greedy": "OPT", "tiny beam3": "OPT", "small greedy": "OPT", "small beam3": "OPT",
        "llama-tiny greedy": "Llama", "llama-tiny beam3": "Llama"}
    for family in ("OPT", "Llama"):
        note = next(n for n in results["notes"] if n.startswith(f"generate, {family} family"))
        for name, row in rows.items():
            assert (f"{name} {row['speedup']:.2f}" in note) == (row["family"] == family), (family, name)


@pytest.mark.slow
def test_accelerator_generation_section_runs_on_a_cpu():
    # the GPU section's code (in-memory shared weights, encoder included, COCO projection) on toy shapes; only the
    # CUDA graphs need the GPU
    notes = []
    out = bench.bench_accelerator_generate(1, notes, device="cpu", pairs=(("tiny", "tiny"),), batches=(1, 3),
                                           dtype=torch.float32, compile=False, new=5, images=10)
    assert set(out["tiny+vit-tiny"]) == {"batch1", "batch3"} and notes
    for row in out["tiny+vit-tiny"].values():
        assert row["same_tokens"] is True and row["beams"] == 3
        assert row["coco_ours_s"] == pytest.approx(-(-10 // row["batch"]) * row["epalm_s"])
        assert all(row[k] > 0 for k in ("ours_tokens_per_s", "transformers_tokens_per_s", "transformers_vit_s"))
    lm, ref = bench.lm_pair_shared("tiny", "cpu", torch.float32)
    assert lm.embed_tokens.weight.data_ptr() == ref.model.decoder.embed_tokens.weight.data_ptr()  # no copy


def test_frozen_weights_get_no_gradients_and_bf16_has_no_fp32_copy(results):
    for modality in ("image", "audio"):
        assert results["train_step"][modality]["frozen_params_with_grad"] == 0
    mem = results["memory"]
    for dtype in ("float32", "bfloat16"):
        assert mem[dtype]["frozen_params_with_grad"] == 0
    assert "float32_frozen" not in mem["bfloat16"]["param_bytes"]
    assert mem["frozen_bytes_ratio_bf16_vs_fp32"] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("prompt,inject", [(2, "late"), (0, "late"), (2, "input")])
def test_train_step_flops_match_torch_flop_counter(prompt, inject):
    # torch's FlopCounterMode counts every matmul/attention product autograd really runs, forward and backward:
    # an independent count of what the step needs (prompt on: the gradient crosses every layer; off: from the
    # injection window on; the input prefix: every layer, the token there from layer 0). It also counts the
    # connector's own weight gradient, which bench leaves out (tiny).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    mode = bench.MODES["tiny"]
    model = bench.build_epalm("tiny", "vit", "tiny", mode, prompt)
    B, T = 2, 8
    ids = torch.randint(4, model.lm.config.vocab_size, (B, T))
    feats = model.encode(bench.media_input("vit", model.encoder, B))
    if inject == "input":  # as bench_train_step builds it
        model, feats = bench.input_prefix(model, prompt), feats[:, -1:]
    # the math kernel runs attention as plain batched products, which the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(None, ids, torch.ones_like(ids), ids, features=feats)
        loss.backward()
    backward_from = 0 if prompt else model.start
    expected = bench.lm_step_flops(model.lm.config, B, T, prompt, model.start, backward_from)
    assert expected == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_encoder_flops_match_torch_flop_counter():
    # torch's FlopCounterMode counts every matmul/conv/attention of a real forward: an independent reference
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    for kind in ("vit", "ast", "timesformer"):
        ours, _ = bench.build_pair(kind, "tiny")
        x = bench.media_input(kind, ours, 2)
        with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            ours(x)
        assert bench.encoder_flops(ours, 2) == pytest.approx(counter.get_total_flops(), rel=0.02), kind


@pytest.mark.slow
def test_quick_mode_runs_at_real_shapes(tmp_path):
    """The issue's CI check: `python bench.py --quick` (real model shapes) completes and reports every section; one
    timed run per figure (--repeats 1) keeps it near 2 minutes on 2 cores: the timings are not asserted."""
    out = tmp_path / "quick.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["backbones"]) == {"opt-125m", "vit-base", "ast-base", "timesformer-base"}
    for row in results["backbones"].values():
        assert row["max_abs_diff"] < 1e-2  # ours and transformers' ran the same weights on the same input
    assert set(results["generate"]) == {"opt-125m greedy", "opt-125m beam3", "small greedy", "small beam3"}
    assert all(r["same_tokens"] for r in results["generate"].values())
    assert results["memory"]["bfloat16"]["frozen_params_with_grad"] == 0


@pytest.mark.slow
def test_distributed_section_runs():
    """bench.py --distributed on the toy LM only, one run each: the numbers it reports exist and make sense."""
    notes = []
    row = bench.bench_distributed(notes, repeats=1, iters=10, lms=("toy LM",))["toy LM"]
    assert row["ddp_samples_per_s"] > 0 and row["fsdp_samples_per_s"] > 0 and row["eval_speedup"] > 0
    assert 0.45 < row["fsdp_frozen_mib_per_process"] / row["frozen_mib"] < 0.55 and notes


def test_quantized_bytes_per_parameter_of_the_papers_lms():
    """The issue's targets at OPT-6.7B's official shape in bf16 (every parameter and buffer counted, the embedding
    in bf16): int8 <= 1.1 and int4 <= 0.6 bytes per parameter; the Llama-family LMs, whose tied embedding is a
    fifth or a sixth of the model, stay above 0.6 in int4, which the README says."""
    table = bench.bench_quantize_bytes()
    assert set(table) == {"opt-2.7b", "opt-6.7b", "llama-3.2-1b", "qwen2.5-1.5b"}
    assert [round(table[n]["params"] / 1e9, 2) for n in table] == [2.65, 6.66, 1.24, 1.54]  # the published sizes
    big = table["opt-6.7b"]
    assert big["bf16"]["bytes_per_param"] == pytest.approx(2.0)
    assert big["int8"]["bytes_per_param"] <= 1.1 and big["int4-g128"]["bytes_per_param"] <= 0.6
    assert table["llama-3.2-1b"]["int4-g128"]["bytes_per_param"] > 0.6


@pytest.mark.slow
def test_quantize_sections_run_at_toy_shapes():
    # the CPU rows on the tiny LMs (no reading test), the loading child, and the GPU section's code on a CPU
    notes = []
    out = bench.bench_quantize(bench.MODES["tiny"], notes)
    assert set(out) == {"tiny", "llama-tiny"} and notes
    for row in out.values():
        assert row["fp32"]["logit_rel_error"] == 0 and row["fp32"]["greedy_token_agreement"] == 1
        assert 0 < row["int8"]["logit_rel_error"] < row["int4-g32"]["logit_rel_error"] < 0.5
        assert row["int8"]["bytes_per_param"] < row["fp32"]["bytes_per_param"] == 4
        assert all(r["step_s"] > 0 and r["greedy_s"] > 0 for r in row.values())
    loading = bench.bench_quantize_loading("opt", "tiny", notes, modes=("none", "int8"))
    assert loading["int8"]["model_bytes"] < loading["none"]["model_bytes"]
    gpu = bench.bench_quantize_accelerator(1, notes, device="cpu", lms=("tiny",), vit_name="tiny", batches=(2,),
                                           dtype=torch.float32, new=3, gen_batch=2, labels=("int8", "int4-g32"))
    assert {"tiny bf16", "tiny int8", "tiny int4-g32"} <= set(gpu)
    assert gpu["tiny int4-g32"]["weights_gb"] < gpu["tiny int8"]["weights_gb"] < gpu["tiny bf16"]["weights_gb"]
    assert all(gpu[k]["batch2"]["samples_per_s"] > 0 for k in gpu if k != "device")
