"""quantize.py against torch's own int8 and int4 kernels (the formats they read are the reference), loading that
quantizes as it reads (OPT and the Llama family), gradients through quantized layers to the adapter, the checkpoint
that remembers the setting, and the one-line errors."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import checkpoint
import hub
from conftest import ROOT, TESTDATA
import quantize
from llama import Llama
from model import EPALM, EPALMConfig, load_backbones
from opt import OPT
from quantize import Quantization, QuantizedLinear, model_bytes, parameter_count, quantize_int4, quantize_int8


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """A tiny OPT and a tiny Llama (untied head, grouped-query attention) of width 64, in the hub layout: every
    linear layer's width is divided by the int4 group sizes 32 and 64."""
    import transformers
    root = tmp_path_factory.mktemp("lms")
    torch.manual_seed(0)
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64)).save_pretrained(root / "opt")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(root / "llama")
    return {"opt": (OPT, root / "opt"), "llama": (Llama, root / "llama")}


def layer_with(weight, scales, mode, group=32) -> QuantizedLinear:
    out = weight.shape[0]
    layer = QuantizedLinear(weight.shape[1] * (2 if mode == "int4" else 1), out, False, mode, group)
    layer.weight.copy_(weight)
    layer.scales = scales
    return layer


def test_int8_is_torchs_int8_kernel_and_rounds_to_the_nearest_step():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(5, 64)
    q, s = quantize_int8(w, torch.float32)
    torch.testing.assert_close(layer_with(q, s, "int8")(x), torch.ops.aten._weight_int8pack_mm(x, q, s))
    assert torch.equal(s, w.abs().amax(1) / 127) and q.abs().amax(1).eq(127).all()  # absmax per output channel
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_has_torchs_layout_and_is_torchs_int4_kernel(group):
    """The scales and zeros, their (groups, out, 2) layout and the packing (even input in the high nibble) are those
    of torch.testing._internal.common_quantization._group_quantize_tensor, written out here (that module needs
    expecttest); torch's CPU int4 kernel, which reads them as the CUDA one does, gives the same outputs."""
    torch.manual_seed(group)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    packed, scales_zeros = quantize_int4(w, group, torch.float32)
    groups = w.reshape(48, -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(48, 256)
    assert torch.equal(packed, (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8))
    assert torch.equal(scales_zeros, torch.cat([scale, low + 8 * scale], -1).transpose(0, 1))
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), group, scales_zeros)
    torch.testing.assert_close(layer_with(packed, scales_zeros, "int4", group)(x), kernel)
    # min-max per group: every weight within half a step of its value
    back = (q.reshape(48, -1, group) - 8) * scale + (low + 8 * scale)
    assert ((back - groups).abs() <= scale / 2 + 1e-6).all()


def test_bf16_scales_are_part_of_the_rounding():
    # q is chosen against the scales as stored: with bf16 scales the int8 error stays within half a (bf16) step
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    q, s = quantize_int8(w, torch.bfloat16)
    assert s.dtype == torch.bfloat16
    assert ((q.float() * s.float()[:, None] - w).abs() <= s.float()[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("mode,group,bound", [("int8", 128, 0.02), ("int4", 32, 0.2)])
def test_loading_quantizes_every_linear_layer(tiny_lms, kind, mode, group, bound):
    cls, folder = tiny_lms[kind]
    full = cls.from_pretrained(folder)
    quantized = cls.from_pretrained(folder, quantization=Quantization(mode, group))
    linears = [n for n, m in full.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(quantized.get_submodule(n), QuantizedLinear) for n in linears)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert quantized.get_submodule(linears[0]).weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        ref, out = full(ids), quantized(ids)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < bound
    assert parameter_count(quantized) == parameter_count(full) == sum(p.numel() for p in full.parameters())
    # the bytes bench.py counts on the meta device for the paper's LMs are the loaded model's bytes
    with torch.device("meta"):
        meta = cls(full.config)
    quantize.quantize_linears(meta, {}, Quantization(mode, group), torch.float32)
    assert model_bytes(meta) == model_bytes(quantized) < model_bytes(full)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_gradients_cross_quantized_layers(tiny_lms, mode):
    """The gradients of the prompt and the connector through a quantized LM are those of the same LM with the
    dequantized weights in plain nn.Linear layers (the autograd function is exact), close to the full-precision
    LM's, and the backward keeps no float copy of a weight."""
    cls, folder = tiny_lms["opt"]
    quantized = cls.from_pretrained(folder, quantization=Quantization(mode, 32))
    full, dequantized = cls.from_pretrained(folder), cls.from_pretrained(folder)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QuantizedLinear):
                dequantized.get_submodule(name).weight.copy_(
                    quantize.dequantize(m.weight, m.scales, m.group_size, torch.float32))
    encoder = nn.Linear(1, 1)
    encoder.hidden_size = 8
    ids = torch.randint(4, 200, (3, 10))
    feats = torch.randn(3, 2, 8)

    def grads(lm, saved=None):
        torch.manual_seed(0)
        model = EPALM(lm, encoder, EPALMConfig(num_levels=2, inject_start=1, inject_end=3, prompt_length=4))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t) \
                if saved is not None else torch.enable_grad():
            _, loss = model(None, ids, torch.ones_like(ids), ids, features=feats)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])

    saved = []
    g_quantized, g_dequantized, g_full = grads(quantized, saved), grads(dequantized), grads(full)
    torch.testing.assert_close(g_quantized, g_dequantized, rtol=1e-4, atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(g_quantized, g_full, dim=0).item()
    assert cosine > (0.99 if mode == "int8" else 0.9), cosine
    shapes = {(m.out_features, m.in_features) for m in quantized.modules() if isinstance(m, QuantizedLinear)}
    assert not [t for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]


def test_checkpoint_rebuilds_the_quantized_lm_unless_told_otherwise(tiny_backbones, tmp_path):
    lm, _, encoder = load_backbones("image", tiny_backbones["lm"], tiny_backbones["image"], quantize="int8")
    model = EPALM(lm, encoder, EPALMConfig(num_levels=2))
    config = {"modality": "image", "task": "caption", "dataset": "toy", "lm": tiny_backbones["lm"],
              "encoder": tiny_backbones["image"], "quantize": "int8", "quantize_group_size": 128,
              "quantize_encoder": False, "epalm": model.config.__dict__}
    hub.save_adapter(model, tmp_path / "ckpt.safetensors", config)
    again, _, loaded = checkpoint.load_model(tmp_path)
    assert loaded["quantize"] == "int8" and isinstance(again.lm.layers[0].fc1, QuantizedLinear)
    assert isinstance(again.encoder.layers[0].mlp.fc1, nn.Linear)
    full, _, loaded = checkpoint.load_model(tmp_path, quantization={"quantize": "none"})
    assert loaded["quantize"] is None and isinstance(full.lm.layers[0].fc1, nn.Linear)
    assert "trainable" in again.parameter_report() and again.parameter_report() == full.parameter_report()
    # sample.py: the checkpoint's int8 decides that bf16 on this CPU is refused, before any backbone loads
    run = [sys.executable, str(ROOT / "sample.py"), "--image", str(TESTDATA / "images" / "hopper.jpg"),
           "--checkpoint", str(tmp_path), "--max_new_tokens", "2", "--device", "cpu"]
    p = subprocess.run([*run, "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == ("error: --quantize int8 with --dtype bfloat16 on a CPU: the "
                                                     "quantized weights are dequantized into bfloat16 for every "
                                                     "matmul, which CPUs run hundreds of times slower than float32: "
                                                     "use --dtype float32")
    p = subprocess.run([*run, "--dtype", "bfloat16", "--quantize", "none"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(str(TESTDATA / "images" / "hopper.jpg") + ":"), p.stderr


def test_what_cannot_be_quantized_is_one_line(tiny_backbones, tiny_lms):
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj has 16 inputs, which int4 groups of 32 do not "
                                         r"divide \(group sizes that do: none\)"):
        load_backbones("image", tiny_backbones["lm"], tiny_backbones["image"], quantize="int4", group_size=32)
    with pytest.raises(ValueError, match="quantize_encoder: the encoder is quantized as the LM is"):
        load_backbones("image", tiny_backbones["lm"], tiny_backbones["image"], quantize_encoder=True)
    with pytest.raises(ValueError, match="quantized weights cannot be sharded: FSDP2 shards floating-point"):
        OPT.from_pretrained(tiny_lms["opt"][1], shard=lambda m: None, quantization=Quantization("int8"))
    with pytest.raises(ValueError, match="quantize 'int3': expected one of int8, int4"):
        Quantization("int3")
    with pytest.raises(ValueError, match="int4 group size 16: expected one of 32, 64, 128"):
        Quantization("int4", 16)
