"""opt.py against transformers' OPT (tiny random checkpoints saved to disk) and the real OPT tokenizer files."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Tokenizer
from transformers import OPTConfig as HFConfig
from transformers import OPTForCausalLM, OPTModel

from conftest import TESTDATA
from opt import OPT, OPTConfig, causal_mask, load_tokenizer, new_cache

TOKENIZER_DIR = TESTDATA / "tokenizer" / "opt"
PRE_LN = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
              max_position_embeddings=40, word_embed_proj_dim=32, do_layer_norm_before=True)
POST_LN_350M = dict(PRE_LN, hidden_size=48, word_embed_proj_dim=32, num_hidden_layers=3, do_layer_norm_before=False)


def reference(kw: dict, folder) -> OPTForCausalLM:
    torch.manual_seed(0)
    model = OPTForCausalLM(HFConfig(**kw, dropout=0.0, attention_dropout=0.0)).eval()
    with torch.no_grad():  # random LayerNorm affines and biases, so a mixed-up weight shows up in the logits
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return model


def batch(vocab: int, pads=(0, 3, 5), length=9):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 1, 0  # left padding with <pad>
    return ids, mask


@pytest.mark.parametrize("kw", [PRE_LN, POST_LN_350M], ids=["pre-ln", "350m-style"])
def test_logits_match_transformers(kw, tmp_path):
    ref = reference(kw, tmp_path)
    model = OPT.from_pretrained(str(tmp_path))
    assert isinstance(model.project_in, torch.nn.Linear) == (kw["word_embed_proj_dim"] != kw["hidden_size"])
    assert isinstance(model.final_layer_norm, torch.nn.LayerNorm) == kw["do_layer_norm_before"]
    assert not model.training and model.embed_tokens.weight.dtype == torch.float32
    ids, mask = batch(kw["vocab_size"])
    with torch.no_grad():
        want_plain = ref(ids).logits
        want_padded = ref(ids, attention_mask=mask).logits
        got_plain, got_padded = model(ids), model(ids, attention_mask=mask)
    assert (got_plain - want_plain).abs().max() < 1e-4
    real = mask.bool()
    assert (got_padded[real] - want_padded[real]).abs().max() < 1e-4
    assert not got_padded.isnan().any()  # pad rows attend to themselves


@pytest.mark.parametrize("kw", [PRE_LN, POST_LN_350M], ids=["pre-ln", "350m-style"])
def test_left_padding_equals_no_padding(kw, tmp_path):
    reference(kw, tmp_path)
    model = OPT.from_pretrained(str(tmp_path))
    ids, mask = batch(kw["vocab_size"], pads=(0, 4))
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, 4:])  # the second row without its pads
    assert (padded[1, 4:] - alone[0]).abs().max() < 1e-4


def test_position_ids_and_mask_known_values():
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert OPT.position_ids(attention_mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    # queries at positions 2 and 3 of four keys; a pad query keeps its own key open
    mask = causal_mask(attention_mask.bool(), torch.tensor([2, 3]))
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    mask = causal_mask(torch.tensor([[False, False, True]]), torch.arange(3))
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_kv_cache_writes_and_reorders_in_place():
    cache = new_cache(OPTConfig(**{**PRE_LN, "num_hidden_layers": 3}), rows=4, slots=6)
    assert len(cache) == 3 and cache[0].k.shape == (4, 4, 6, 8) and not any(c.k.any() or c.v.any() for c in cache)
    layer = cache[1]
    addresses = layer.k.data_ptr(), layer.v.data_ptr()
    k, v = torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8)
    got_k, got_v = layer.write(torch.tensor([2, 3]), k, v)
    assert got_k is layer.k and torch.equal(got_k[:, :, 2:4], k) and torch.equal(got_v[:, :, 2:4], v)
    assert not layer.k[:, :, [0, 1, 4, 5]].any() and not cache[0].k.any()
    before = layer.k.clone()
    layer.reorder(torch.tensor([3, 3, 0, 1]), start=3, end=5)  # only slots 3 and 4 follow the new rows
    assert torch.equal(layer.k[:, :, 3:5], before[[3, 3, 0, 1], :, 3:5])
    assert torch.equal(layer.k[:, :, :3], before[:, :, :3]) and torch.equal(layer.k[:, :, 5:], before[:, :, 5:])
    assert (layer.k.data_ptr(), layer.v.data_ptr()) == addresses
    layer.every(2).write(torch.tensor([0]), torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8))  # rows 0 and 2, views
    assert layer.k[[0, 2], :, 0].eq(1).all() and not layer.k[[1, 3], :, 0].any()


def test_bare_decoder_prefix_and_lm_head_load(tmp_path):
    ref = reference(POST_LN_350M, tmp_path / "hf")
    folder = tmp_path / "bare"
    folder.mkdir()
    state = {k.removeprefix("model."): v.clone().contiguous() for k, v in ref.state_dict().items()}
    state["lm_head.weight"] = state["decoder.embed_tokens.weight"].clone()  # as old checkpoints ship it
    assert any(k.startswith("decoder.layers.") for k in state)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = OPT.from_pretrained(str(folder), dtype=torch.float64)
    assert model.embed_tokens.weight.dtype == torch.float64
    ids, _ = batch(POST_LN_350M["vocab_size"])
    with torch.no_grad():
        assert (model(ids).float() - ref(ids).logits).abs().max() < 1e-4


def test_missing_weight_is_reported(tmp_path):
    ref = reference(PRE_LN, tmp_path)
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items() if "layers.1.fc2.weight" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.fc2.weight"):
        OPT.from_pretrained(str(tmp_path))


def test_config_from_dict_and_errors():
    config = OPTConfig.from_dict({**PRE_LN, "word_embed_proj_dim": None, "architectures": ["OPTForCausalLM"],
                                  "_remove_final_layer_norm": False})
    assert config.word_embed_proj_dim == 32 and config.hidden_size == 32
    with pytest.raises(ValueError, match="num_attention_heads"):
        OPTConfig.from_dict({**PRE_LN, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="opt-7b"):
        OPTConfig.from_name("facebook/opt-7b")


# Published sizes of the official checkpoints (embeddings included, tied LM head counted once).
KNOWN_PARAMS = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080,
                "opt-2.7b": 2_651_596_800, "opt-6.7b": 6_658_473_984}


@pytest.mark.parametrize("name", ["opt-125m", "facebook/opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b",
                                  "opt-13b", "opt-30b", "opt-66b"])
def test_from_name_parameter_counts(name):
    config = OPTConfig.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in OPT(config).parameters())
        hf = OPTModel(HFConfig(**{k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
            "max_position_embeddings", "word_embed_proj_dim", "do_layer_norm_before")}))
        theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs
    short = name.split("/")[-1]
    if short in KNOWN_PARAMS:
        assert ours == KNOWN_PARAMS[short]
    if short == "opt-350m":
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim,
                config.word_embed_proj_dim, config.do_layer_norm_before) == (1024, 24, 16, 4096, 512, False)


def test_tokenizer_known_ids_and_round_trip():
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    text = "Today is a beautiful day and I want to"
    ids = tokenizer.encode(text).ids
    assert ids == [2, 5625, 16, 10, 2721, 183, 8, 38, 236, 7]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]


def test_tokenizer_matches_transformers():
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    ref = GPT2Tokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), bos_token="</s>",
                        eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    for text in ["Hello world", "  two  spaces\nand a newline", "café naïve 日本語 🙂", "A dog </s> inside",
                 "what is on the table? </a> a red apple", "1234567 + 89 = ?"]:
        ids = tokenizer.encode(text).ids
        assert ids == ref(text).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_tokenizer_json_is_preferred(tmp_path):
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    json.loads((tmp_path / "tokenizer.json").read_text())
    again = load_tokenizer(str(tmp_path))  # no vocab.json / merges.txt there
    assert again.encode("a red apple").ids == tokenizer.encode("a red apple").ids == [2, 102, 1275, 15162]


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))
