"""llama.py against transformers' Llama, Qwen2 and Mistral (tiny random checkpoints saved to disk), its tokenizer
against transformers' fast tokenizer, and eP-ALM's invariants (model.py, generate.py) on a Llama-family LM."""
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import data
import generate
from llama import Llama, LlamaConfig, load_tokenizer
from model import EPALM, EPALMConfig, load_backbones
from conftest import ROOT
from test_generate import reference_beam_search
from test_model import left_padded, tiny_encoder

VOCAB = 80
BASE = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
CASES = {  # odd small shapes: head_dim 6, GQA with 1 and 2 key-value heads
    "llama-kv1-untied": ("llama", dict(BASE, num_key_value_heads=1)),
    "qwen2-kv2-tied-qkv-bias": ("qwen2", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope-kv2-tied-bias": ("llama", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True,
                                                attention_bias=True, rope_scaling=LLAMA3_ROPE)),
    "mistral-head-dim-8": ("mistral", dict(BASE, num_key_value_heads=2, head_dim=8, sliding_window=48)),
}
HF = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def reference(case: str, folder, seed=0, init_std=None, eos=None, layers=None):
    """transformers' model of the case, random (norm weights and biases too), saved in the hub layout."""
    kind, kw = CASES[case]
    config_class, model_class = HF[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**kw, "num_hidden_layers": layers or kw["num_hidden_layers"]})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init_std and p.dim() == 2:  # peaked distributions: no near-ties for search to break differently
                p.normal_(0, init_std)
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    return model


def batch(pads=(0, 3, 5), length=9):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_with_left_padding(case, tmp_path):
    ref = reference(case, tmp_path, init_std=0.3)  # large weights: positions matter to attention
    model = Llama.from_pretrained(str(tmp_path))
    kind, kw = CASES[case]
    assert (model.lm_head is None) == kw.get("tie_word_embeddings", False)
    assert (model.layers[0].q_proj.bias is not None) == (kind == "qwen2" or kw.get("attention_bias", False))
    assert (model.layers[0].o_proj.bias is not None) == kw.get("attention_bias", False)
    assert model.layers[0].k_proj.out_features == kw["num_key_value_heads"] * model.config.head_dim
    ids, mask = batch()
    with torch.no_grad():
        want_plain, want_padded = ref(ids).logits, ref(ids, attention_mask=mask).logits
        got_plain, got_padded = model(ids), model(ids, attention_mask=mask)
    assert (got_plain - want_plain).abs().max() < 1e-4
    real = mask.bool()
    assert (got_padded[real] - want_padded[real]).abs().max() < 1e-4
    assert not got_padded.isnan().any()
    with torch.no_grad():  # the padded row alone, without its pads
        assert (model(ids[1:2, 3:])[0] - got_padded[1, 3:]).abs().max() < 1e-4
    if "rope_scaling" in kw:  # the scaling is exercised: without it the logits differ
        model.config.rope = {"rope_type": "default", "rope_theta": 10000.0}
        with torch.no_grad():
            assert (model(ids) - want_plain).abs().max() > 1e-3


def test_config_reads_official_and_transformers_5_layouts(tmp_path):
    reference("llama3-rope-kv2-tied-bias", tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in new
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                                      if k != "rope_type"}})
    assert LlamaConfig.from_dict(old).rope == LlamaConfig.from_dict(new).rope
    assert LlamaConfig.from_dict(new).rope["rope_type"] == "llama3"
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7]}
    config = LlamaConfig.from_dict(new, gen)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, [2, 7], 2)
    mistral = LlamaConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": 48})
    assert mistral.max_position_embeddings == 48 and mistral.head_dim == 6 and mistral.num_key_value_heads == 4
    for bad, match in [({"model_type": "gemma"}, "model_type 'gemma'"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
                       ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
                       ({"hidden_act": "gelu"}, "hidden_act 'gelu'")]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig.from_dict({**BASE, "model_type": "llama", **bad})


def test_sharded_checkpoint_loads_and_a_missing_weight_is_named(tmp_path):
    ref = reference("llama-kv1-untied", tmp_path / "sharded")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = Llama.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float64)
    ids, _ = batch()
    with torch.no_grad():
        assert (model(ids).float() - ref(ids).logits).abs().max() < 1e-4
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    (tmp_path / "broken").mkdir()
    save_file(state, str(tmp_path / "broken" / "model.safetensors"))
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    with pytest.raises(ValueError, match="layers.1.up_proj.weight"):
        Llama.from_pretrained(str(tmp_path / "broken"))


def epalm(case, tmp_path, prompt_length=0, num_levels=2, **kw):
    ref = reference(case, tmp_path / case, **kw)
    lm = Llama.from_pretrained(str(tmp_path / case))
    torch.manual_seed(1)
    return EPALM(lm, tiny_encoder(), EPALMConfig(num_levels=num_levels, prompt_length=prompt_length)), ref


def hf_new_tokens(ref, ids, mask, eos, **kw):
    out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
    rows = out[:, ids.shape[1]:].tolist()
    return [next((r[:i] for i, t in enumerate(r) if t in eos), r) for r in rows]


@pytest.mark.parametrize("case,seed", [("llama-kv1-untied", 0), ("qwen2-kv2-tied-qkv-bias", 1),
                                       ("llama3-rope-kv2-tied-bias", 2), ("mistral-head-dim-8", 3)])
@pytest.mark.slow
def test_greedy_and_beam_search_match_transformers_with_an_eos_list(case, seed, tmp_path):
    m, ref = epalm(case, tmp_path, seed=seed, init_std=0.4, eos=[2, 7])
    assert m.lm.config.eos_token_id == [2, 7]  # generation_config.json's list
    ids, mask = left_padded([[1, 5, 6, 7 + seed, 8], [1, 9, 10], [1, 30 + seed]])
    assert m.generate(None, ids, mask, max_new_tokens=12) == hf_new_tokens(ref, ids, mask, [2, 7],
                                                                         max_new_tokens=12)
    theirs = hf_new_tokens(ref, ids, mask, [2, 7], max_new_tokens=12, num_beams=3, length_penalty=1.0,
                           early_stopping=True)
    assert m.generate(None, ids, mask, max_new_tokens=12, num_beams=3) == theirs


@pytest.mark.parametrize("case,tokens", [("llama-kv1-untied", 4), ("qwen2-kv2-tied-qkv-bias", 2)])
def test_media_tokens_per_level_are_the_query_heads_per_key_value_head(case, tokens, tmp_path):
    m, _ = epalm(case, tmp_path)
    H = m.lm.config.hidden_size
    assert m.media_tokens == tokens and m.connector[0].out_features == tokens * H
    feats = torch.randn(3, 2, m.encoder.hidden_size)
    inj = m.inject_tokens(features=feats)
    assert inj.shape == (3, 2, tokens, H)
    torch.testing.assert_close(inj[1, 0, -1], m.connector[0](feats[1, 0])[-H:])  # the tokens are the output cut
    one = EPALM(m.lm, m.encoder, EPALMConfig(num_levels=2, prompt_length=0, media_tokens=1))  # eP-ALM's layout
    assert one.media_tokens == 1 and one.inject_tokens(features=feats).shape == (3, 2, 1, H)


def test_prefill_and_decode_steps_equal_transformers_logits(tmp_path):
    m, ref = epalm("qwen2-kv2-tied-qkv-bias", tmp_path)
    ids, mask = batch()  # left pads (0, 3, 5): the third row's prefill is all padding
    n, T = 5, ids.shape[1]
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        M = m.media_tokens  # the first text slot: the media tokens' slots come first
        cache = m.lm.new_cache(3, M + T)
        assert cache[0].k.shape == (3, 2, M + T, 6)  # key-value heads only
        first, valid = generate.prefill(m, ids[:, :n], mask[:, :n], None, cache, T - n)
        positions = m.lm.position_ids(mask)
        got = [first] + [generate.decode_one_token(m, cache, ids[:, t], positions[:, t], torch.tensor([M + t]),
                                                   valid) for t in range(n, T)]
    for i, logits in enumerate(got):
        real = mask[:, n - 1 + i].bool()
        torch.testing.assert_close(logits[real], want[real, n - 1 + i], atol=1e-4, rtol=0)


def reference_forward(m, feats, ids):
    """The method written out for one unpadded sample, layer by layer, plain causal attention: the M media
    tokens of a level (the connector's output cut in M) at positions -(P+M)..-(P+1), the prompt at -P..-1, the
    text from 0 (model.py's docstring)."""
    lm, P, K, M = m.lm, m.config.prompt_length, m.config.num_levels, m.media_tokens
    inj = torch.stack([m.connector[0](feats[k]).view(M, -1) for k in range(K)])
    h = torch.cat([m.prompt_vectors(), lm.embed_tokens(ids)])
    pos = torch.arange(-P, len(ids))
    width = m.end - m.start
    for i, layer in enumerate(lm.layers):
        level = [k for k in range(K) if m.start + (k * width) // K == i]
        if i == m.start:
            h, pos = torch.cat([inj[0], h]), torch.arange(-P - M, len(ids))
        elif level:
            h = torch.cat([inj[level[0]], h[M:]])
        h = layer(h[None], None, rotary=lm.rotary(pos[None]))[0]
    return lm.logits(h[None, -len(ids):])[0]


def test_injection_matches_the_method_written_out(tmp_path):
    m, _ = epalm("llama3-rope-kv2-tied-bias", tmp_path, prompt_length=3, layers=5)
    assert m.media_tokens == 2  # 4 query heads per 2 key-value heads
    torch.manual_seed(0)
    img = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    logits, _ = m(img, ids)
    torch.testing.assert_close(logits[0], reference_forward(m, m.encode(img)[0], ids[0]), atol=1e-5, rtol=0)


def test_no_future_leak_and_left_padding_changes_nothing(tmp_path):
    m, _ = epalm("llama-kv1-untied", tmp_path, prompt_length=3, layers=4)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    rows = [[1, 5, 6, 7, 8, 9], [1, 11, 12, 13]]
    ids, mask = left_padded(rows)
    logits, _ = m(img, ids, mask)
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(3, VOCAB, changed[:, t + 1:].shape)
        real = mask[:, :t + 1].bool()
        torch.testing.assert_close(m(img, changed, mask)[0][:, :t + 1][real], logits[:, :t + 1][real],
                                   atol=1e-5, rtol=0)
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, -len(r):], m(img[b:b + 1], torch.tensor([r]))[0][0], atol=1e-5, rtol=0)


def test_media_enters_only_at_the_window(tmp_path):
    m, _ = epalm("qwen2-kv2-tied-qkv-bias", tmp_path, prompt_length=2, layers=5)
    outputs = []
    for i, layer in enumerate(m.lm.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: outputs.append((i, out)))
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.manual_seed(0)
    runs = []
    for img in (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)):
        outputs.clear()
        m(img, ids)
        runs.append(dict(outputs))
    for i in range(len(m.lm.layers)):
        same = torch.equal(runs[0][i], runs[1][i])
        assert same == (i < m.start), i
        assert runs[0][i].shape[1] == 2 + 4 + m.media_tokens * (i >= m.start)  # media slots from the window on


@pytest.mark.slow
def test_cached_generation_and_beams_equal_full_recompute(tmp_path):
    m, _ = epalm("llama3-rope-kv2-tied-bias", tmp_path, prompt_length=3, layers=5, init_std=0.4, seed=2)
    torch.manual_seed(0)
    img = torch.randn(3, 3, 16, 16)
    rows = [[1, 5, 6, 7, 8], [1, 9], [1, 11, 12]]
    ids, mask = left_padded(rows)
    greedy = m.generate(img, ids, mask, max_new_tokens=6, eos_token_id=-1)
    for b, r in enumerate(rows):
        seq = torch.tensor([r])
        for _ in range(6):
            seq = torch.cat([seq, m(img[b:b + 1], seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert greedy[b] == seq[0, len(r):].tolist()
    got = m.generate(img, ids, mask, max_new_tokens=6, num_beams=3, length_penalty=0.7)
    with torch.no_grad():
        assert got == [reference_beam_search(m, img[b:b + 1], r, 3, 6, 2, 0.7) for b, r in enumerate(rows)]
    assert got == [m.generate(img[b:b + 1], torch.tensor([r]), max_new_tokens=6, num_beams=3,
                              length_penalty=0.7)[0] for b, r in enumerate(rows)]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tmp_path):
    m, _ = epalm("mistral-head-dim-8", tmp_path, init_std=0.4)
    ids, mask = left_padded([[1, 5, 6, 7, 8], [1, 9, 10]])
    eager = m.generate(None, ids, mask, max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile failure would fall back to eager with a warning
        assert m.generate(None, ids, mask, max_new_tokens=6, compile=True) == eager


def llama3_style_tokenizer(folder):
    """A tiny byte-level BPE tokenizer.json with Llama 3's special tokens after the vocabulary, BOS added by its
    post-processor, no pad token; config.json and generation_config.json (an EOS list) as the hub has them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a photo of a dog on the grass", "what is on the table? a red apple", "two cats, naïve café 🙂"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n = tok.get_vocab_size()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", n)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({**BASE, "model_type": "llama", "vocab_size": n + 3,
                                                    "bos_token_id": n, "eos_token_id": n + 1}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": n, "eos_token_id": [n + 1, n + 2]}))
    return n


def test_tokenizer_matches_transformers_and_the_text_layout(tmp_path):
    n = llama3_style_tokenizer(tmp_path / "tok")
    ours = load_tokenizer(str(tmp_path / "tok"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    for text in ["a photo of a dog", "  two  spaces\nand a newline", "café naïve 日本語 🙂", "what? red apple"]:
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids and ids[0] == n, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (n, n + 1, n + 1)  # pads with EOS
    ids, mask, targets = data.text_batch(ours, ["", "what is on the table?"], [" a dog", " a red apple"])
    plain = [ref(t, add_special_tokens=False).input_ids for t in ("what is on the table?", " a dog", " a red apple")]
    long = [n] + plain[0] + plain[2] + [n + 1]
    short = [n] + plain[1] + [n + 1]
    assert ids.tolist() == [[n + 1] * (len(long) - len(short)) + short, long]
    assert mask.tolist() == [[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)]
    assert targets[1].tolist() == [-100] * (1 + len(plain[0])) + plain[2] + [n + 1]


def test_load_backbones_picks_the_family_from_model_type(tmp_path):
    reference("qwen2-kv2-tied-qkv-bias", tmp_path / "lm")
    n = llama3_style_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / "lm" / name).write_text((tmp_path / "tok" / name).read_text())
    transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=32, image_size=16, patch_size=8),
                          add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    lm, tokenizer, _ = load_backbones("image", str(tmp_path / "lm"), str(tmp_path / "vit"))
    assert isinstance(lm, Llama) and lm.config.eos_token_id == [n + 1, n + 2]
    assert tokenizer.eos_token_id == n + 1
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a supported LM"):
        load_backbones("image", str(tmp_path / "lm"), str(tmp_path / "vit"))


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from llama import Llama
dist.init_process_group("gloo")
sharded = Llama.from_pretrained(sys.argv[2], shard=lambda lm: [fully_shard(layer) for layer in lm.layers])
whole = Llama.from_pretrained(sys.argv[2])
mine = sum(p.to_local().numel() for p in sharded.layers.parameters())
ids = torch.tensor([[1, 5, 6, 7, 8], [0, 0, 1, 9, 10]])
with torch.no_grad():
    diff = (sharded(ids, (ids > 0).long()) - whole(ids, (ids > 0).long())).abs().max().item()
print(f"rank {dist.get_rank()}: diff {diff:.2e} share {mine / sum(p.numel() for p in whole.layers.parameters()):.3f}")
del sharded
import distributed
distributed.finish()  # as train.py leaves: a bare destroy_process_group here let gloo abort at exit now and then
"""


@pytest.mark.slow
def test_fsdp_shards_one_unit_per_layer_and_gives_the_same_logits(tmp_path):
    reference("llama-kv1-untied", tmp_path / "lm")
    (tmp_path / "run.py").write_text(FSDP_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "run.py"),
                        str(ROOT), str(tmp_path / "lm")], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        # the two processes print at once: lines may run together, so the numbers are matched exactly
        diff, share = re.search(rf"rank {rank}: diff (\d\.\d\de[-+]\d+) share (\d\.\d{{3}})", p.stdout).groups()
        assert float(diff) < 1e-5 and 0.4 < float(share) < 0.6, p.stdout  # each process: about half of each layer


def test_an_adapter_saved_before_media_tokens_existed_loads_with_one_token(tmp_path):
    import checkpoint
    import hub
    lm_dir, vit_dir = str(ROOT / "toy" / "llama"), str(ROOT / "toy" / "vit")  # the shipped toy backbones
    lm, _, encoder = load_backbones("image", lm_dir, vit_dir)
    torch.manual_seed(0)
    model = EPALM(lm, encoder, EPALMConfig(num_levels=2, media_tokens=1))
    epalm = {k: v for k, v in model.config.__dict__.items() if k != "media_tokens"}  # the older config
    config = {"modality": "image", "task": "caption", "dataset": "toy", "lm": lm_dir, "encoder": vit_dir,
              "epalm": epalm}
    hub.save_adapter(model, tmp_path / "ckpt.safetensors", config)
    again, _, _ = checkpoint.load_model(tmp_path)
    default = EPALM(lm, encoder, EPALMConfig(num_levels=2))
    assert again.media_tokens == 1 and default.media_tokens == 2
    import card  # the model card says so where a level is more than one token
    assert card.tokens_each(again) == "" and card.tokens_each(default).startswith(" (2 tokens each")
    img, ids = torch.randn(1, 3, 32, 32), torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(img, ids)[0], model(img, ids)[0])
