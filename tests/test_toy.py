"""The miniature world (toy.py), the toy backbones' builder (toy_pretrain.py) and the committed backbones.

References: the official hub layout is checked by loading each toy checkpoint into the transformers model of
the same kind and comparing outputs with ours; the tokenizer against transformers' GPT2TokenizerFast; the
world's facts (captions, splits, scores) against values written out by hand."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import toy
import toy_pretrain
from conftest import ROOT


def media_array(media):
    if isinstance(media, torch.Tensor):
        return media.numpy()
    if isinstance(media, list):
        return np.stack([np.asarray(f) for f in media])
    return np.asarray(media)


@pytest.mark.parametrize("modality", toy.MODALITIES)
def test_samples_are_deterministic(modality):
    a, b, c = (toy.samples(modality, "train", 6, seed) for seed in (3, 3, 4))
    for x, y in zip(a, b):
        assert x["combo"] == y["combo"] and x["caption"] == y["caption"] and x["qa"] == y["qa"]
        assert np.array_equal(media_array(x["media"]), media_array(y["media"]))
    assert any(not np.array_equal(media_array(x["media"]), media_array(z["media"])) for x, z in zip(a, c))


@pytest.mark.parametrize("modality", toy.MODALITIES)
def test_media_types_and_shapes(modality):
    media = toy.samples(modality, "heldout", 1, 0)[0]["media"]
    if modality == "image":
        assert media.mode == "RGB" and media.size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE)
    elif modality == "audio":
        assert media.dtype == torch.float32 and media.shape == (toy.SAMPLE_RATE,) and media.abs().max() < 1
    else:
        assert len(media) == toy.NUM_FRAMES and all(f.mode == "RGB" for f in media)


@pytest.mark.parametrize("modality", toy.MODALITIES)
def test_heldout_split_is_disjoint_and_every_value_is_trained(modality):
    train, held = toy.combinations(modality, "train"), toy.combinations(modality, "heldout")
    key = lambda c: tuple(sorted(c.items()))
    assert not {key(c) for c in train} & {key(c) for c in held}
    n_all = int(np.prod([len(v) for v in toy.attributes(modality).values()]))
    assert len(train) + len(held) == n_all and round(0.3 * n_all) == len(held)
    for a, values in toy.attributes(modality).items():
        assert {c[a] for c in train} == set(values)
    assert all(s["combo"] in held for s in toy.samples(modality, "heldout", 20, 0))


def test_captions_and_questions():
    assert toy.caption("image", dict(shape="circle", colour="red", size="small", position="left")) == \
        "a small red circle on the left"
    assert toy.caption("audio", dict(count="three", length="short", pitch="high", kind="beep")) == \
        "three short high beeps"
    assert toy.caption("audio", dict(count="one", length="long", pitch="low", kind="buzz")) == "one long low buzz"
    assert toy.caption("video", dict(shape="square", colour="blue", direction="up")) == "a blue square moves up"
    qa = toy.questions("image", dict(shape="circle", colour="red", size="small", position="left"))
    assert ("what colour is the circle?", "red") in qa
    for m in toy.MODALITIES:
        for combo in toy.combinations(m, "all")[:5]:
            for q, a in toy.questions(m, combo):
                assert q.endswith("?") and a in combo.values() and " " not in a
    with pytest.raises(ValueError, match="modality 'smell'"):
        toy.attributes("smell")
    with pytest.raises(ValueError, match="split 'test'"):
        toy.combinations("image", "test")


def test_attribute_accuracy_and_chance():
    combo = dict(count="three", length="short", pitch="high", kind="beep")
    scores = toy.attribute_accuracy("audio", [({"combo": combo}, "three short high beeps"),
                                              ({"combo": combo}, "two short low beeps and high")])
    assert scores == {"count accuracy": 0.5, "length accuracy": 1.0, "pitch accuracy": 0.5, "kind accuracy": 1.0,
                      "attribute accuracy": 0.75}
    vqa = toy.attribute_accuracy("audio", [({"combo": combo, "answer": "high"}, " high"),
                                           ({"combo": combo, "answer": "three"}, "two")])
    assert vqa == {"count accuracy": 0.0, "pitch accuracy": 1.0, "attribute accuracy": 0.5}
    assert toy.chance("image") == {"shape": 0.25, "colour": 0.2, "size": 0.5, "position": 0.25}


def test_lm_corpus_puts_the_answer_in_context():
    docs = toy_pretrain.lm_corpus(300, seed=1)
    assert docs == toy_pretrain.lm_corpus(300, seed=1) and all(d.endswith("</s>") for d in docs)
    with_context = [d for d in docs if d.count("</s>") == 2]
    assert 0.7 < len(with_context) / len(docs) < 0.9
    values = {v for m in toy.MODALITIES for vs in toy.attributes(m).values() for v in vs}
    for d in with_context:  # every attribute value the caption or answer names was given before it
        context, text, _ = d.split("</s>")
        target = text.split(" </a> ")[1] if " </a> " in text else text
        named = {v for v in values for w in target.split() if w in (v, v + "s", v + "es")}
        assert named and named <= set(context.split()), d


# ---- the committed checkpoints ----

def test_builder_configs_are_the_committed_ones(tmp_path):
    # what toy_pretrain.py writes next to the weights, byte for byte (the constants it imports included)
    lm_vocab = json.loads((toy.TOY_DIR / "lm" / "config.json").read_text())["vocab_size"]
    written = {"lm/config.json": toy_pretrain.lm_hf_config(lm_vocab),
               "llama/config.json": toy_pretrain.llama_hf_config(lm_vocab)}  # one corpus, one vocabulary
    for name in ("vit", "ast", "timesformer"):
        written[f"{name}/config.json"] = toy_pretrain.HF_CONFIGS[name]
        written[f"{name}/preprocessor_config.json"] = toy_pretrain.PREPROCESSOR_CONFIGS[name]
    for i, (path, obj) in enumerate(written.items()):
        toy_pretrain._write_json(tmp_path / f"{i}.json", obj)
        assert (tmp_path / f"{i}.json").read_bytes() == (toy.TOY_DIR / path).read_bytes(), path


def test_data_does_not_import_the_builder():
    code = "import sys, data; print('toy' in sys.modules, 'toy_pretrain' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["True", "False"]


def test_toy_checkpoints_are_small_and_in_hub_layout():
    files = [p for p in toy.TOY_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    for name in ("lm", "llama", "vit", "ast", "timesformer"):
        assert (toy.TOY_DIR / name / "config.json").is_file() and (toy.TOY_DIR / name / "model.safetensors").is_file()
    assert {p.name for p in (toy.TOY_DIR / "lm").iterdir()} >= {"vocab.json", "merges.txt"}
    assert (toy.TOY_DIR / "llama" / "tokenizer.json").is_file()


def test_toy_llama_is_the_toy_opts_size():
    # the two toy LMs compare as families, not as sizes: parameters within 5%, and no bigger on disk
    import llama
    import opt

    counts = [sum(p.numel() for p in cls.from_pretrained(str(toy.TOY_DIR / name)).parameters())
              for cls, name in ((opt.OPT, "lm"), (llama.Llama, "llama"))]
    assert abs(counts[1] / counts[0] - 1) < 0.05, counts
    size = [(toy.TOY_DIR / name / "model.safetensors").stat().st_size for name in ("lm", "llama")]
    assert size[1] <= size[0], size


@pytest.mark.slow
def test_toy_llama_builder_writes_the_committed_files(tmp_path):
    # two training steps: the tokenizer (trained again from the same corpus), config.json and the weight names
    # and shapes are the committed ones, and the folder reloads (build_lm checks the reload itself)
    from safetensors import safe_open

    toy_pretrain.build_lm(tmp_path, "llama", steps=2, log=lambda _: None)
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / name).read_bytes() == (toy.TOY_DIR / "llama" / name).read_bytes(), name
    shapes = []
    for folder in (tmp_path, toy.TOY_DIR / "llama"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            shapes.append({k: f.get_slice(k).get_shape() for k in f.keys()})
    assert shapes[0] == shapes[1] and "model.layers.3.mlp.gate_proj.weight" in shapes[0]


def test_toy_tokenizer_matches_gpt2_tokenizer_and_round_trips():
    import opt

    ours = opt.load_tokenizer(str(toy.TOY_DIR / "lm"))
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(toy.TOY_DIR / "lm"))  # vocab.json + merges.txt
    assert [ours.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    for m in toy.MODALITIES:
        for s in toy.samples(m, "heldout", 3, 0):
            for text in [s["caption"], s["qa"][0][0] + toy.QA_SEPARATOR + s["qa"][0][1]]:
                ids = ours.encode(text).ids
                assert ids[0] == 2 and ids[1:] == ref(text)["input_ids"]
                assert ours.decode(ids, skip_special_tokens=True) == text
    for m in toy.MODALITIES:  # every attribute value is one token (the LM copies it from its context)
        for v in (v for vs in toy.attributes(m).values() for v in vs):
            assert len(ours.encode(" " + v).ids) == 2, v


def test_toy_llama_tokenizer_is_the_toy_opts_with_the_same_text_layout():
    import data
    import llama
    import opt

    ours = llama.load_tokenizer(str(toy.TOY_DIR / "llama"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(toy.TOY_DIR / "llama" / "tokenizer.json"))
    opt_tok = opt.load_tokenizer(str(toy.TOY_DIR / "lm"))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 2, 1)  # `</s>`, `</s>`, `<pad>`
    texts = [s["caption"] for m in toy.MODALITIES for s in toy.samples(m, "heldout", 3, 0)]
    texts += [data.vqa_prompt(q) + " " + a for m in toy.MODALITIES for q, a in toy.samples(m, "train", 1, 0)[0]["qa"]]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == opt_tok.encode(text).ids == ref(text)["input_ids"] and ids[0] == 2
        assert ours.decode(ids) == text
    prompts, targets = ["", data.vqa_prompt("what colour is the circle?")], [" a small red circle", " red"]
    for a, b in zip(data.text_batch(ours, prompts, targets), data.text_batch(opt_tok, prompts, targets)):
        assert torch.equal(a, b)  # `</s> prompt target </s>`, left padded with <pad>: the toy OPT's batches


LM_FAMILIES = {"lm": ("opt", "OPT", "OPTForCausalLM"), "llama": ("llama", "Llama", "LlamaForCausalLM")}


@pytest.mark.parametrize("name", LM_FAMILIES)
def test_toy_lm_loads_matches_transformers_and_reads_its_context(name):
    module_name, cls, ref_cls = LM_FAMILIES[name]
    module = __import__(module_name)
    lm = getattr(module, cls).from_pretrained(str(toy.TOY_DIR / name))
    ref = getattr(transformers, ref_cls).from_pretrained(str(toy.TOY_DIR / name)).eval()
    tok = module.load_tokenizer(str(toy.TOY_DIR / name))
    combo = toy.combinations("image", "heldout")[0]
    prompt = "".join(" " + v for v in reversed(list(combo.values()))) + "</s>"  # as in lm_corpus
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
        for _ in range(12):  # greedy: the caption of the attributes it was given
            nxt = lm(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == 2:
                break
    assert tok.decode(ids[0].tolist(), skip_special_tokens=False).split("</s>")[2] == toy.caption("image", combo)


ENCODER_REFERENCE = {"vit": "ViTModel", "ast": "ASTModel", "timesformer": "TimesformerModel"}


@pytest.mark.slow
@pytest.mark.parametrize("modality", toy.MODALITIES)
def test_toy_encoder_loads_matches_transformers_and_separates_heldout_attributes(modality):
    name = toy.ENCODER_OF[modality]
    cls = {"vit": "vit.ViT", "ast": "ast_audio.AST", "timesformer": "timesformer.TimeSformer"}[name]
    module = __import__(cls.split(".")[0])
    encoder = getattr(module, cls.split(".")[1]).from_pretrained(str(toy.encoder_dir(modality)))
    kwargs = {"add_pooling_layer": False} if name == "vit" else {}
    ref = getattr(transformers, ENCODER_REFERENCE[name]).from_pretrained(str(toy.encoder_dir(modality)), **kwargs)
    ref.eval()

    train, held = toy.samples(modality, "train", 160, 0), toy.samples(modality, "heldout", 60, 0)
    x_train, y_train = toy_pretrain.media_batch(modality, encoder, train)
    x_held, y_held = toy_pretrain.media_batch(modality, encoder, held)
    with torch.no_grad():
        f_train, f_held = encoder(x_train, last=1)[-1][:, 0], encoder(x_held, last=1)[-1][:, 0]
        torch.testing.assert_close(encoder(x_held[:4], last=1)[-1], ref(x_held[:4]).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)

    # nearest class mean on the train combinations' [CLS], scored on held-out combinations
    for i, (a, values) in enumerate(toy.attributes(modality).items()):
        means = torch.stack([f_train[y_train[:, i] == k].mean(0) for k in range(len(values))])
        pred = torch.cdist(f_held, means).argmin(1)
        accuracy = (pred == y_held[:, i]).float().mean().item()
        assert accuracy > 0.5 + 0.5 / len(values), (a, accuracy)


@pytest.mark.parametrize("name", ["lm", "llama"])
def test_the_shipped_toy_lms_copy_every_attribute_from_their_context(name):
    # what eP-ALM relies on: the frozen LM already reads the words it is given (toy_pretrain.reading_test); an
    # attribute it does not copy from text cannot be taught by the adapter. Every held-out combination, greedy.
    import llama
    import opt

    folder = str(toy.TOY_DIR / name)
    lm = (opt.OPT if name == "lm" else llama.Llama).from_pretrained(folder)
    scores = toy_pretrain.reading_test(lm, opt.load_tokenizer(folder))
    assert set(scores) == set(toy.MODALITIES)
    for modality, accuracy in scores.items():
        assert set(accuracy) == {f"{a} accuracy" for a in toy.ATTRIBUTES[modality]} | {"attribute accuracy"}
        assert min(accuracy.values()) >= 0.95, (modality, accuracy)


def test_the_reading_test_fails_an_lm_that_does_not_read():
    # the same shapes untrained: it cannot copy, so the test must say so (and the summary names what it misses)
    import opt

    folder = str(toy.TOY_DIR / "lm")
    config = opt.OPTConfig.from_dict(json.loads((toy.TOY_DIR / "lm" / "config.json").read_text()))
    torch.manual_seed(0)
    scores = toy_pretrain.reading_test(toy_pretrain.init_weights(opt.OPT(config)).eval(), opt.load_tokenizer(folder))
    assert all(s["attribute accuracy"] < 0.5 for s in scores.values()), scores
    summary = toy_pretrain.reading_summary(scores)
    assert summary.startswith("reads its context: image ") and "shape " in summary, summary


def test_toy_py_builds_the_named_backbones_into_out(monkeypatch, tmp_path):
    # `python toy.py lm ast --out DIR` (or --out=DIR): a rebuild beside the shipped files, to compare with them
    calls = []
    monkeypatch.setattr(toy_pretrain, "build", lambda names, out: calls.append((tuple(names), out)))
    toy_pretrain.main(["lm", "--out", str(tmp_path), "ast"])
    toy_pretrain.main([f"--out={tmp_path}"])
    toy_pretrain.main(["llama"])
    assert calls == [(("lm", "ast"), tmp_path), (toy_pretrain.BACKBONES, tmp_path), (("llama",), toy.TOY_DIR)]
    for argv, words in [(["--out"], "--out: expected a folder"), (["gpt"], "toy backbone 'gpt' is not one of")]:
        with pytest.raises(SystemExit, match=words):
            toy_pretrain.main(argv)
