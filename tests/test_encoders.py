"""Parity of vit.py (also as CLIP's vision tower and DINOv2), timesformer.py and the AST in ast_audio.py with
transformers' ViTModel, CLIPVisionModel, Dinov2Model, TimesformerModel and ASTModel (tiny random models saved in
the hub layout), timm-layout loading, preprocessing against transformers' image processors on real photos/video,
and parameter counts of the official shapes."""
import json
import wave

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TESTDATA
from ast_audio import AST, ASTConfig
from timesformer import TimeSformer, TimeSformerConfig
from vit import ViT, ViTConfig, read_clip, read_dinov2

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
PHOTOS = ["COCO_val2014_000000262148.jpg", "hopper.jpg", "hopper_gray.jpg"]


def reference_levels(ref, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output through the reference's final LayerNorm, and its last_hidden_state."""
    with torch.no_grad():
        out = ref(inputs, output_hidden_states=True)
        n = ref.config.num_hidden_layers
        assert len(out.hidden_states) == n + 1  # embeddings, then one per block
        return [ref.layernorm(h) for h in out.hidden_states[1:]], out.last_hidden_state


def assert_levels(ours: list, expected: list, last_hidden: torch.Tensor):
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"level {i}")
    torch.testing.assert_close(ours[-1], last_hidden, atol=1e-4, rtol=1e-4)


def save_reference(model, folder):
    model.eval().save_pretrained(folder)
    return folder


# ---- ViT ----

@pytest.mark.parametrize("head", [False, True])
def test_vit_matches_transformers_every_level(tmp_path, head):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**TINY, image_size=32, patch_size=8)
    if head:  # keys under "vit." plus a classifier to drop
        full = transformers.ViTForImageClassification(cfg).eval()
        save_reference(full, tmp_path)
        ref = full.vit
    else:  # ViTModel saves a pooler to drop
        ref = transformers.ViTModel(cfg).eval()
        save_reference(ref, tmp_path)
    model = ViT.from_pretrained(str(tmp_path))
    assert not model.training and model.hidden_size == 32 and model.cls_token.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    expected, last_hidden = reference_levels(ref.eval(), x)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)
        last2 = model(x, last=2)
    assert len(last2) == 2
    for a, b in zip(last2, expected[-2:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="last=4"):
        model(x, last=4)
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 3, 16, 16))
    half = ViT.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(half(x.bfloat16(), last=1)[0].float(), last_hidden, atol=0.1, rtol=0.05)


def hf_vit_to_timm(state: dict, n_layers: int) -> dict:
    """The timm layout of an HF ViTModel state dict, built key by key the way timm names things."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"],
           "head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}
    for i in range(n_layers):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[tm + f"attn.qkv.{p}"] = torch.cat([state[hf + f"attention.attention.{n}.{p}"]
                                                   for n in ("query", "key", "value")])
            out[tm + f"attn.proj.{p}"] = state[hf + f"attention.output.dense.{p}"]
            out[tm + f"norm1.{p}"] = state[hf + f"layernorm_before.{p}"]
            out[tm + f"norm2.{p}"] = state[hf + f"layernorm_after.{p}"]
            out[tm + f"mlp.fc1.{p}"] = state[hf + f"intermediate.dense.{p}"]
            out[tm + f"mlp.fc2.{p}"] = state[hf + f"output.dense.{p}"]
    return out


def test_vit_timm_layout_gives_identical_output(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(**TINY, image_size=32, patch_size=8, layer_norm_eps=1e-6)  # timm's eps
    ref = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "hf")
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    save_file(hf_vit_to_timm(load_file(tmp_path / "hf" / "model.safetensors"), 3), timm_dir / "model.safetensors")
    (timm_dir / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 5,
        "model_args": {"embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0, "img_size": 32,
                       "patch_size": 8},
        "pretrained_cfg": {"tag": "augreg_in21k_ft_in1k", "input_size": [3, 32, 32], "interpolation": "bicubic",
                           "crop_pct": 0.9, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    model = ViT.from_pretrained(str(timm_dir))
    assert model.config.layer_norm_eps == 1e-6 and model.norm.eps == 1e-6
    x = torch.randn(2, 3, 32, 32)
    expected, last_hidden = reference_levels(ref, x)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)
    # timm's eval transform: short side to floor(32 / 0.9) = 35 with bicubic, center crop 32
    assert (model.transform.shortest_edge, model.transform.crop, model.transform.resample) == (35, (32, 32), 3)


def test_vit_preprocess_matches_vit_image_processor(tmp_path):
    images = [Image.open(TESTDATA / "images" / name) for name in PHOTOS]
    model = ViT(ViTConfig(**TINY, image_size=224, patch_size=16))  # defaults: 224x224 bilinear, mean = std = 0.5
    expected = transformers.ViTImageProcessor()([im.convert("RGB") for im in images], return_tensors="pt")
    torch.testing.assert_close(model.preprocess(images), expected["pixel_values"], atol=1e-5, rtol=0)
    # settings read from a checkpoint's preprocessor_config.json (non-default size, resample and statistics)
    torch.manual_seed(2)
    save_reference(transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=8)), tmp_path)
    processor = transformers.ViTImageProcessor(size={"height": 40, "width": 56}, resample=3,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(tmp_path)
    loaded = ViT.from_pretrained(str(tmp_path))
    expected = processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    assert expected.shape == (3, 3, 40, 56)
    torch.testing.assert_close(loaded.preprocess(images), expected, atol=1e-5, rtol=0)


def test_vit_bad_checkpoint_names_the_keys(tmp_path):
    torch.manual_seed(3)
    save_reference(transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=8)), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.output.dense.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2\.bias"):
        ViT.from_pretrained(str(tmp_path))


# ---- CLIP's vision tower and DINOv2 (through ViT) ----

ODD = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, patch_size=8, image_size=40)


def randomize(model):
    """Random values everywhere, so that unit LayerNorm weights or layer scales cannot hide a missing parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def clip_reference(tmp_path, full: bool, seed=6):
    torch.manual_seed(seed)
    vision = dict(ODD, intermediate_size=40)
    if full:  # the hub's openai/clip-vit-*: text tower, projections and logit_scale to drop
        text = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, vocab_size=99,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = randomize(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)))
    else:
        model = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)))
    save_reference(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ("clip" if full else
                                                                                 "clip_vision_model")
    return model.vision_model if full else model  # transformers 5's CLIPVisionModel is the tower itself


@pytest.mark.parametrize("full", [True, False])
def test_clip_vision_matches_transformers_every_level(tmp_path, full):
    ref = clip_reference(tmp_path, full)
    model = ViT.from_pretrained(str(tmp_path))
    assert model.config.hidden_act == "quick_gelu" and model.patch_embed.bias is None and model.norm.eps == 1e-5
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        assert len(out.hidden_states) == 4
        # CLIP's final norm is post_layernorm, which it applies to the pooled [CLS] only
        expected = [ref.post_layernorm(h) for h in out.hidden_states[1:]]
        ours = model(x)
        last2 = model(x, last=2)
    assert len(ours) == 3
    for i, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"level {i}")
    torch.testing.assert_close(ours[-1][:, 0], out.pooler_output, atol=1e-4, rtol=1e-4)
    for a, b in zip(last2, expected[-2:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="48x48"):  # no position interpolation for CLIP
        model(torch.randn(1, 3, 48, 48))


def dinov2_reference(tmp_path, seed=7, **extra):
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(**ODD, mlp_ratio=3, layerscale_value=0.5, **extra)
    ref = randomize(transformers.Dinov2Model(cfg))
    save_reference(ref, tmp_path)
    return ref


@pytest.mark.parametrize("size", [(40, 40), (56, 48), (60, 44)])  # the checkpoint's, another, not patch multiples
def test_dinov2_matches_transformers_every_level(tmp_path, size):
    ref = dinov2_reference(tmp_path)
    assert "embeddings.mask_token" in load_file(tmp_path / "model.safetensors")
    model = ViT.from_pretrained(str(tmp_path))
    assert model.config.intermediate_size == 72 and model.layers[0].ls1 is not None
    x = torch.randn(2, 3, *size)
    expected, last_hidden = reference_levels(ref, x)
    assert last_hidden.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 24)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)
        last1 = model(x, last=1)
    torch.testing.assert_close(last1[0], last_hidden, atol=1e-4, rtol=1e-4)
    if size == (56, 48):
        half = ViT.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(half(x.bfloat16(), last=1)[0].float(), last_hidden, atol=0.1, rtol=0.05)


def test_dinov2_classifier_checkpoint_drops_the_head(tmp_path):
    torch.manual_seed(8)
    full = randomize(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**ODD, num_labels=5)))
    save_reference(full, tmp_path)
    model = ViT.from_pretrained(str(tmp_path))
    x = torch.randn(1, 3, 40, 40)
    expected, last_hidden = reference_levels(full.dinov2, x)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)


def test_clip_and_dinov2_bad_configs_are_one_line_errors(tmp_path):
    dinov2_reference(tmp_path / "giant", use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="use_swiglu_ffn") as error:
        ViT.from_pretrained(str(tmp_path / "giant"))
    assert "\n" not in str(error.value)
    clip_reference(tmp_path / "clip", full=True)
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    del config["vision_config"]
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_config") as error:
        ViT.from_pretrained(str(tmp_path / "clip"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size, hidden, layers, heads", [("base-patch16", 768, 12, 12), ("large-patch14", 1024, 24, 16)])
def test_clip_official_shapes_parameter_counts(size, hidden, layers, heads):
    """openai/clip-vit-{size}'s vision config as transformers writes it (nested in the CLIPModel's config.json)."""
    vision = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                           num_attention_heads=heads, patch_size=int(size[-2:]))
    raw = transformers.CLIPConfig(vision_config=vision.to_dict()).to_dict()
    config, _ = read_clip(raw, {})
    with torch.device("meta"):
        assert count(ViT(config)) == count(transformers.CLIPVisionModel(vision))


@pytest.mark.parametrize("hidden, layers, heads", [(384, 12, 6), (768, 12, 12), (1024, 24, 16)])
def test_dinov2_official_shapes_parameter_counts(hidden, layers, heads):
    """facebook/dinov2-small/base/large: image_size 518, patch 14; ours has no mask_token (hidden_size values)."""
    cfg = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    image_size=518)
    config, _ = read_dinov2(cfg.to_dict(), {})
    with torch.device("meta"):
        assert count(ViT(config)) == count(transformers.Dinov2Model(cfg)) - hidden


# The preprocessor_config.json files of openai/clip-vit-base-patch16 and facebook/dinov2-base, as on the hub
CLIP_PROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                  "feature_extractor_type": "CLIPFeatureExtractor",
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                  "resample": 3, "size": 224}
DINOV2_PROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                    "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
                    "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
                    "size": {"shortest_edge": 256}}


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_clip_and_dinov2_preprocess_match_their_image_processors(tmp_path, kind):
    """Both processors: short side to 224 (CLIP) / 256 (DINOv2) bicubic, center crop 224, their own statistics.
    transformers 5 resizes with Pillow too when torchvision is absent (as here): the max abs difference measured on
    every image of tests/data/images is 4.8e-7 (CLIP) and 7.2e-7 (DINOv2), float rounding only."""
    images = [Image.open(TESTDATA / "images" / name) for name in PHOTOS]
    rgb = [im.convert("RGB") for im in images]
    processor_class = transformers.CLIPImageProcessor if kind == "clip" else transformers.BitImageProcessor
    official = CLIP_PROCESSOR if kind == "clip" else DINOV2_PROCESSOR
    (clip_reference if kind == "clip" else dinov2_reference)(tmp_path, **({"full": True} if kind == "clip" else {}))
    bare = ViT.from_pretrained(str(tmp_path))  # no preprocessor_config.json: the official settings by default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    loaded = ViT.from_pretrained(str(tmp_path))
    processor = processor_class.from_pretrained(str(tmp_path))
    expected = processor(rgb, return_tensors="pt")["pixel_values"]
    assert expected.shape == (3, 3, 224, 224)
    for model in (loaded, bare):
        torch.testing.assert_close(model.preprocess(images), expected, atol=1e-5, rtol=0)
    # another short side and crop, from the checkpoint's file: the int size is the short side for both
    settings = dict(official, size=72, crop_size={"height": 64, "width": 48})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    loaded = ViT.from_pretrained(str(tmp_path))
    expected = processor_class.from_pretrained(str(tmp_path))(rgb, return_tensors="pt")["pixel_values"]
    assert expected.shape == (3, 3, 64, 48)
    torch.testing.assert_close(loaded.preprocess(images), expected, atol=1e-5, rtol=0)


# ---- TimeSformer ----

def tiny_timesformer(tmp_path, num_frames=4, seed=4):
    torch.manual_seed(seed)
    cfg = transformers.TimesformerConfig(**TINY, image_size=32, patch_size=8, num_frames=num_frames)
    full = transformers.TimesformerForVideoClassification(cfg).eval()  # "timesformer." keys + a classifier
    full.save_pretrained(tmp_path)
    return full.timesformer


def test_timesformer_matches_transformers_every_level(tmp_path):
    ref = tiny_timesformer(tmp_path)
    model = TimeSformer.from_pretrained(str(tmp_path))
    assert not model.training and model.hidden_size == 32
    x = torch.randn(2, 4, 3, 32, 32)
    expected, last_hidden = reference_levels(ref, x)
    assert last_hidden.shape == (2, 1 + 16 * 4, 32)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)
        last1 = model(x, last=1)
    assert len(last1) == 1
    torch.testing.assert_close(last1[0], last_hidden, atol=1e-4, rtol=1e-4)


def test_timesformer_fewer_frames_interpolates_time_embeddings(tmp_path):
    """transformers' embeddings interpolate the time embeddings (nearest) for T != num_frames, but its layers reshape
    with config.num_frames, so its own model cannot run a 2-frame clip on a 4-frame checkpoint. The reference is
    therefore a num_frames=2 TimesformerModel holding the same weights and the nearest-interpolated time
    embeddings; that this interpolation is transformers' own is checked on its embeddings module."""
    ref4 = tiny_timesformer(tmp_path / "ckpt")
    model = TimeSformer.from_pretrained(str(tmp_path / "ckpt"))
    ref2 = transformers.TimesformerModel(transformers.TimesformerConfig(
        **TINY, image_size=32, patch_size=8, num_frames=2)).eval()
    state = ref4.state_dict()
    state["embeddings.time_embeddings"] = F.interpolate(
        state["embeddings.time_embeddings"].transpose(1, 2), size=2, mode="nearest").transpose(1, 2)
    ref2.load_state_dict(state)
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref4.embeddings(x), ref2.embeddings(x))
    expected, last_hidden = reference_levels(ref2, x)
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)


def video_frames(path, n):
    with av.open(str(path)) as container:
        frames = [f.to_image() for _, f in zip(range(n), container.decode(video=0))]
    assert len(frames) == n
    return frames


def test_timesformer_preprocess_matches_videomae_image_processor(tmp_path):
    clip = video_frames(TESTDATA / "video" / "armwrestling_340x256.mp4", 3)
    photos = [Image.open(TESTDATA / "images" / name).convert("RGB") for name in PHOTOS]
    model = TimeSformer(TimeSformerConfig(**TINY))  # defaults: short side 224, center crop 224, 0.45 / 0.225
    processor = transformers.VideoMAEImageProcessor(image_mean=[0.45] * 3, image_std=[0.225] * 3)
    expected = processor([clip, photos], return_tensors="pt")["pixel_values"]
    assert expected.shape == (2, 3, 3, 224, 224)
    torch.testing.assert_close(model.preprocess([clip, photos]), expected, atol=1e-5, rtol=0)
    # settings from a checkpoint's preprocessor_config.json
    tiny_timesformer(tmp_path)
    processor = transformers.VideoMAEImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36},
                                                    image_mean=[0.45] * 3, image_std=[0.225] * 3, resample=3)
    processor.save_pretrained(tmp_path)
    loaded = TimeSformer.from_pretrained(str(tmp_path))
    expected = processor([clip], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(loaded.preprocess([clip]), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="frame counts"):
        model.preprocess([clip, clip[:2]])


# ---- AST ----

@pytest.mark.parametrize("eps", [1e-12, 1e-6])
def test_ast_matches_transformers_every_level(tmp_path, eps):
    torch.manual_seed(5)
    cfg = transformers.ASTConfig(**TINY, num_mel_bins=32, max_length=64, layer_norm_eps=eps,
                                 frequency_stride=10, time_stride=12)
    full = transformers.ASTForAudioClassification(cfg).eval()  # "audio_spectrogram_transformer." + classifier
    full.save_pretrained(tmp_path)
    model = AST.from_pretrained(str(tmp_path))
    assert model.norm.eps == eps and model.layers[0].norm1.eps == eps
    x = torch.randn(2, 64, 32)
    expected, last_hidden = reference_levels(full.audio_spectrogram_transformer, x)
    assert last_hidden.shape == (2, 2 + 2 * 5, 32)  # (32-16)//10+1 = 2 by (64-16)//12+1 = 5 patches
    with torch.no_grad():
        assert_levels(model(x), expected, last_hidden)
        last2 = model(x, last=2)
    for a, b in zip(last2, expected[-2:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="frames, mel bins"):
        model(torch.randn(2, 32, 64))


def read_wav(path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2 and f.getnchannels() == 1 and f.getframerate() == 16000
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768


def test_ast_preprocess_matches_ast_feature_extractor():
    speech = read_wav(TESTDATA / "audio" / "speech_16k_mono.wav")
    waves = [speech[:16000], speech[:4000]]  # 98 frames (cut to 64) and 23 frames (zero-padded)
    model = AST(ASTConfig(**TINY, max_length=64))
    extractor = transformers.ASTFeatureExtractor(max_length=64)
    expected = extractor(waves, sampling_rate=16000, return_tensors="pt")["input_values"]
    ours = model.preprocess(waves)
    assert ours.shape == expected.shape == (2, 64, 128)
    # transformers' numpy fbank (no torchaudio here) and ours differ by float rounding (~4e-6 seen)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours[1, 23:] == expected[1, 23:]).all()  # the padding rows: normalised zeros


# ---- official shapes ----

def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, ours, reference", [
    ("vit-base-patch16-224", lambda n: ViT(ViTConfig.from_name(n)),
     lambda: transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)),
    ("google/vit-large-patch16-224", lambda n: ViT(ViTConfig.from_name(n)),
     lambda: transformers.ViTModel(transformers.ViTConfig(hidden_size=1024, num_hidden_layers=24,
                                                          num_attention_heads=16, intermediate_size=4096),
                                   add_pooling_layer=False)),
    ("timesformer-base", lambda n: TimeSformer(TimeSformerConfig()),  # the defaults are the official shapes
     lambda: transformers.TimesformerModel(transformers.TimesformerConfig())),
    ("MIT/ast-finetuned-audioset-10-10-0.4593", lambda n: AST(ASTConfig(frequency_stride=10, time_stride=10)),
     lambda: transformers.ASTModel(transformers.ASTConfig())),
])
def test_official_shapes_parameter_counts(name, ours, reference):
    with torch.device("meta"):
        a, b = ours(name), reference()
    assert count(a) == count(b)
    if name.startswith("vit-base"):
        assert round(count(a) / 1e6) == 86  # the paper's "ViT-B, 86M" (85.8M without the classifier)


def test_vit_from_name_rejects_unknown_names_and_official_shapes():
    assert ViTConfig.from_name("timm/vit_base_patch16_224.augreg_in21k_ft_in1k").layer_norm_eps == 1e-6
    assert ViTConfig.from_name("google/vit-base-patch16-224").layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="resnet-50"):
        ViTConfig.from_name("resnet-50")
    ast = AST(ASTConfig())  # the AudioSet checkpoint's 10x10 strides over 128 x 1024
    assert ast.grid == (12, 101) and ast.pos_embed.shape == (1, 12 * 101 + 2, 768)
    assert TimeSformerConfig().num_frames == 8  # the Kinetics checkpoints' clip length


def test_ast_reads_its_normalisation_from_preprocessor_config(tmp_path):
    """A checkpoint whose fbank statistics are not AudioSet's (e.g. fine-tuned on another data set) is normalised
    with its own, as ASTFeatureExtractor saved with that checkpoint normalises."""
    torch.manual_seed(0)
    transformers.ASTModel(transformers.ASTConfig(max_length=64, **TINY)).save_pretrained(tmp_path)
    extractor = transformers.ASTFeatureExtractor(max_length=64, mean=-3.0, std=2.5)
    extractor.save_pretrained(tmp_path)
    model = AST.from_pretrained(str(tmp_path))
    assert (model.config.feature_mean, model.config.feature_std) == (-3.0, 2.5)
    speech = read_wav(TESTDATA / "audio" / "speech_16k_mono.wav")[:8000]
    expected = extractor([speech], sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(model.preprocess([speech]), expected, atol=1e-4, rtol=0)
    from data import MediaTransform
    torch.testing.assert_close(MediaTransform.for_encoder("audio", model)(torch.from_numpy(speech))[None], expected,
                               atol=1e-4, rtol=0)


def test_a_clip_shorter_than_one_fbank_window_is_padded_not_an_error():
    """10 ms (160 samples) is less than one 25 ms window: the official front end pads the spectrogram to 1024
    frames anyway; here the clip gives one frame of its own, then the padding rows."""
    short = torch.from_numpy(read_wav(TESTDATA / "audio" / "speech_16k_mono.wav")[4000:4160])
    model = AST(ASTConfig(**TINY, max_length=64))
    x = model.preprocess([short])
    assert x.shape == (1, 64, 128) and torch.isfinite(x).all()
    padded = model.preprocess([torch.nn.functional.pad(short - short.mean(), (0, 240))])
    torch.testing.assert_close(x, padded, atol=1e-5, rtol=0)  # = the clip zero-padded to one window by hand
    assert not torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, -1])  # one frame, then padding
