"""generate.py: the KV cache path against transformers' OPT, beam search against transformers' generate and
against a plain per-sample beam search on uncached forwards, the compiled decode step, and the stopping hook."""
import pytest
import torch

import generate
from model import EPALM, EPALMConfig
from opt import OPT, new_cache
from test_model import hf_new_tokens, left_padded, tiny_encoder, tiny_epalm, tiny_lm
from test_opt import POST_LN_350M, PRE_LN, batch, reference

ROWS = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 30], [2, 40, 41, 42], [2, 17]]


def eos_prone(tmp_path, seed=3, boost=1.5):
    """A tiny random LM whose tied EOS row is scaled up, so that samples end at different steps."""
    lm, ref = tiny_lm(tmp_path, seed=seed, init_std=0.4)
    with torch.no_grad():
        for emb in (lm.embed_tokens.weight, ref.model.decoder.embed_tokens.weight):
            emb[2] *= boost
    return EPALM(lm, tiny_encoder(), EPALMConfig(num_levels=2, prompt_length=0)), ref


@pytest.mark.parametrize("kw", [PRE_LN, POST_LN_350M], ids=["pre-ln", "350m-style"])
def test_prefill_and_decode_steps_equal_transformers_logits(kw, tmp_path):
    # EPALM with no prompt and no media is plain OPT: prefill 5 tokens of a left-padded batch, then feed the
    # rest one at a time through the decode step; every real position's logits are transformers'
    ref = reference(kw, tmp_path)
    m = EPALM(OPT.from_pretrained(str(tmp_path)), tiny_encoder(),
              EPALMConfig(num_levels=2, prompt_length=0))
    ids, mask = batch(kw["vocab_size"])  # left pads (0, 3, 5): the third row's prefill is all padding
    n, T = 5, ids.shape[1]
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        cache = new_cache(m.lm.config, 3, 1 + T)
        first, valid = generate.prefill(m, ids[:, :n], mask[:, :n], None, cache, T - n)
        positions = m.lm.position_ids(mask)
        got = [first] + [generate.decode_one_token(m, cache, ids[:, t], positions[:, t], torch.tensor([1 + t]), valid)
                         for t in range(n, T)]
    for i, logits in enumerate(got):  # the logits after position n - 1 + i
        real = mask[:, n - 1 + i].bool()
        torch.testing.assert_close(logits[real], want[real, n - 1 + i], atol=1e-4, rtol=0)
    assert not torch.stack(got).isnan().any()


def test_decode_step_after_reorder_follows_the_rows(tmp_path):
    # as beams do: rows share a prefilled prefix, decode two different tokens each, then rows take other rows'
    # histories (only the generated slots move): the next step equals a full forward on the reordered rows
    reference(PRE_LN, tmp_path)
    m = EPALM(OPT.from_pretrained(str(tmp_path)), tiny_encoder(), EPALMConfig(num_levels=2, prompt_length=0))
    ids, _ = batch(PRE_LN["vocab_size"], pads=(0, 0, 0))
    ids[:, :6] = ids[0, :6]
    index, T, n = torch.tensor([2, 2, 0]), ids.shape[1], 6
    with torch.no_grad():
        want = m(None, ids[index])[0][:, -1]
        cache = new_cache(m.lm.config, 3, 1 + T)
        _, valid = generate.prefill(m, ids[:, :n], torch.ones(3, n, dtype=torch.long), None, cache, T - n)
        for t in (n, n + 1):
            generate.decode_one_token(m, cache, ids[:, t], torch.full((3,), t), torch.tensor([1 + t]), valid)
        for layer in cache:
            layer.reorder(index, 1 + n, 1 + n + 2)
        got = generate.decode_one_token(m, cache, ids[index, -1], torch.full((3,), T - 1), torch.tensor([T]), valid)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed,boost", [(3, 1.5), (2, 1.0), (1, 2.0)])
def test_samples_finishing_at_different_steps_match_transformers(tmp_path, seed, boost):
    m, ref = eos_prone(tmp_path, seed, boost)
    ids, mask = left_padded(ROWS)
    greedy = m.generate(None, ids, mask, max_new_tokens=12)
    assert greedy == hf_new_tokens(ref, ids, mask, max_new_tokens=12, num_beams=1)
    beams = m.generate(None, ids, mask, max_new_tokens=12, num_beams=3)
    assert beams == hf_new_tokens(ref, ids, mask, max_new_tokens=12, num_beams=3, early_stopping=True)
    lengths = {len(r) for r in greedy} | {len(r) for r in beams}
    assert len(lengths) >= 3 and min(lengths) < 12  # the test means something: rows end at different steps


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 2.0, -1.0])
def test_beam_search_length_penalties_match_transformers(tmp_path, length_penalty):
    m, ref = eos_prone(tmp_path)
    ids, mask = left_padded(ROWS)
    for beams in (2, 4):
        ours = m.generate(None, ids, mask, max_new_tokens=10, num_beams=beams, length_penalty=length_penalty)
        assert ours == hf_new_tokens(ref, ids, mask, max_new_tokens=10, num_beams=beams,
                                     length_penalty=length_penalty, early_stopping=True), beams


def test_max_new_tokens_reached_without_eos(tmp_path):
    m, ref = eos_prone(tmp_path, seed=0, boost=1.0)
    ids, mask = left_padded(ROWS)
    ref.generation_config.eos_token_id = None
    for beams in (1, 3):
        ours = m.generate(None, ids, mask, max_new_tokens=9, num_beams=beams, eos_token_id=-1)
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=1, eos_token_id=None,
                           max_new_tokens=9, num_beams=beams, early_stopping=True)
        assert ours == out[:, ids.shape[1]:].tolist()
        assert all(len(r) == 9 for r in ours)


def test_eos_defaults_to_the_lms(tmp_path):
    m, _ = eos_prone(tmp_path)
    ids, mask = left_padded(ROWS)
    assert m.generate(None, ids, mask, max_new_tokens=8) == m.generate(None, ids, mask, max_new_tokens=8,
                                                                       eos_token_id=2)
    m.lm.config.eos_token_id = 7  # not a hard-coded 2
    other = m.generate(None, ids, mask, max_new_tokens=8)
    assert other == m.generate(None, ids, mask, max_new_tokens=8, eos_token_id=7)
    assert other != m.generate(None, ids, mask, max_new_tokens=8, eos_token_id=2)


def reference_beam_search(m, img, ids, beams, max_new, eos, length_penalty):
    """transformers' beam search (early_stopping=True) written plainly for one unpadded sample, every step a
    full forward without a cache: the best 2 x beams continuations, the best `beams` non-ending go on, the
    ending ones among the best `beams` finish while fewer than `beams` have."""
    running, finished = [(0.0, [])], []
    for t in range(1, max_new + 1):
        cands = []
        for score, toks in running:
            logits, _ = m(img, torch.tensor([ids + toks]))
            logp = torch.log_softmax(logits[0, -1].float(), -1)
            top = logp.topk(2 * beams)
            cands += [(score + v, toks, tok) for v, tok in zip(top.values.tolist(), top.indices.tolist())]
        cands = sorted(cands, key=lambda c: -c[0])[:2 * beams]
        full, running = len(finished) == beams, []
        for rank, (score, toks, tok) in enumerate(cands):
            if tok == eos or t == max_new:
                if rank < beams and not full:
                    finished.append((score / t ** length_penalty, toks + ([] if tok == eos else [tok])))
            elif len(running) < beams:
                running.append((score, toks + [tok]))
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        if len(finished) == beams:
            break
    return finished[0][1]


@pytest.mark.parametrize("use_features", [False, True])
def test_beam_search_with_media_and_prompt_equals_per_sample_reference(tmp_path, use_features):
    m = tiny_epalm(tmp_path, init_std=0.4, seed=2, layers=6)
    m.eval()
    torch.manual_seed(0)
    img = torch.randn(3, 3, 16, 16)
    rows = [[2, 5, 6, 7, 8], [2, 9], [2, 11, 12]]
    ids, mask = left_padded(rows)
    feats = m.encode(img) if use_features else None
    got = m.generate(None if use_features else img, ids, mask, max_new_tokens=7, num_beams=3, features=feats,
                     length_penalty=0.7)
    with torch.no_grad():
        want = [reference_beam_search(m, img[b:b + 1], r, 3, 7, 2, 0.7) for b, r in enumerate(rows)]
    assert got == want
    # and batched left padding changes nothing: each sample alone gives the same
    alone = [m.generate(img[b:b + 1], torch.tensor([r]), max_new_tokens=7, num_beams=3, length_penalty=0.7)[0]
             for b, r in enumerate(rows)]
    assert got == alone
    # the media token matters: without it, some sample's beams differ
    assert m.generate(None, ids, mask, max_new_tokens=7, num_beams=3, length_penalty=0.7) != got


def test_greedy_left_padded_batch_equals_samples_alone(tmp_path):
    m = tiny_epalm(tmp_path, init_std=0.4)
    torch.manual_seed(0)
    img = torch.randn(3, 3, 16, 16)
    rows = [[2, 5, 6, 7, 8, 9, 10], [2, 9], [2, 11, 12]]
    ids, mask = left_padded(rows)
    got = m.generate(img, ids, mask, max_new_tokens=9, eos_token_id=-1)
    assert got == [m.generate(img[b:b + 1], torch.tensor([r]), max_new_tokens=9, eos_token_id=-1)[0]
                   for b, r in enumerate(rows)]


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus(tmp_path):
    m = tiny_epalm(tmp_path)
    ids, mask = left_padded(ROWS)
    torch.manual_seed(5)
    a = m.generate(None, ids, mask, max_new_tokens=6, temperature=0.8, top_p=0.9, eos_token_id=-1)
    torch.manual_seed(5)
    assert a == m.generate(None, ids, mask, max_new_tokens=6, temperature=0.8, top_p=0.9, eos_token_id=-1)
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])  # softmax: 0.70, 0.26, 0.035, 0.013
    assert {generate.pick_token(logits, 1.0, top_p=0.9).item() for _ in range(50)} == {0, 1}
    assert generate.pick_token(logits).item() == 0


def test_greedy_picks_the_first_of_tied_maxima_as_argmax_does():
    # transformers' greedy search takes argmax: the lowest index among equal logits, in every row
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -3.0]])
    assert generate.pick_token(logits).tolist() == logits.argmax(-1).tolist() == [1, 0, 0]


@pytest.mark.parametrize("length", [600, 5000, 5120, 15000, 50272])
def test_blockwise_argmax_and_top_k_equal_torchs(length):
    # rows long enough to be searched block by block: whole blocks and a tail (5000, 50272) or none (5120); ties
    # placed across blocks, within one, and between a block and the tail
    torch.manual_seed(length)
    x = torch.randn(6, length)
    x[1, 7] = x[1, length - 3] = 9.0  # first tie in the first block, second in the tail (or the last block)
    x[2, 130] = x[2, 300] = 9.0       # two blocks
    x[3, 131] = x[3, 140] = 9.0       # one block
    x[4, length - 1] = 9.0            # the very last value
    x[5] = x[5].round(decimals=1)     # many ties everywhere
    assert torch.equal(generate.first_argmax(x), x.argmax(-1))
    for k in (1, 2, 6):
        values, index = generate.top_k(x, k)
        expected = x.topk(k)
        assert torch.equal(values, expected.values)
        assert torch.equal(x.gather(1, index), values) and (index < length).all()
        assert all(len(set(row)) == k for row in index.tolist())  # k distinct places


def test_all_done_decides_when_to_stop_and_layers_run_through_call(tmp_path):
    # with a hook that never agrees, rows finished early keep being fed (all ranks run the same steps) and the
    # tokens do not change; every LM layer and encoder block is called through its module (FSDP's hooks)
    m, _ = eos_prone(tmp_path, seed=2, boost=1.5)
    m.encoder = tiny_encoder()
    ids, mask = left_padded(ROWS)
    torch.manual_seed(0)
    img = torch.randn(5, 3, 16, 16)
    calls = {"layer": 0, "block": 0}
    for layer in m.lm.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
    for block in m.encoder.layers:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__("block", calls["block"] + 1))
    L = len(m.lm.layers)
    for beams in (1, 3):
        calls.update(layer=0, block=0)
        local = m.generate(img, ids, mask, max_new_tokens=12, num_beams=beams)
        assert calls["layer"] < 8 * L  # every row is done early: the local check stops it
        assert calls["block"] == len(m.encoder.layers)  # the encoder ran once, for all beams
        calls.update(layer=0, block=0)
        seen = []
        kept = m.generate(img, ids, mask, max_new_tokens=12, num_beams=beams,
                          all_done=lambda done: seen.append(done) or False)
        assert kept == local
        assert len(seen) == 11 and seen[-1] is True  # asked after each step but the last
        assert calls["layer"] == 12 * L  # one prefill and 11 decode steps
    # greedy: a hook that says stop after the first step gives the first token
    first = m.generate(img, ids, mask, max_new_tokens=12, eos_token_id=-1, all_done=lambda done: True)
    assert first == m.generate(img, ids, mask, max_new_tokens=1, eos_token_id=-1)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tmp_path):
    # greedy on 6 rows and 3 beams on 2 samples: the same step shapes, so one compile serves both
    m, _ = eos_prone(tmp_path, seed=2, boost=1.0)
    for beams, rows in ((1, ROWS + [[2, 50, 51]]), (3, [ROWS[0], ROWS[3]])):
        ids, mask = left_padded(rows)
        eager = m.generate(None, ids, mask, max_new_tokens=8, num_beams=beams)
        compiled = m.generate(None, ids, mask, max_new_tokens=8, num_beams=beams, compile=True)
        assert compiled == eager
    step = generate.decode_step(True, torch.device("cpu"))
    assert step is not generate.decode_one_token and step is generate.decode_step(True, torch.device("cpu"))


def test_a_failing_compiled_step_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    m, _ = eos_prone(tmp_path, seed=2, boost=1.0)
    ids, mask = left_padded(ROWS)
    eager = m.generate(None, ids, mask, max_new_tokens=8, num_beams=3)

    def broken(*args):
        raise RuntimeError("CUDA graphs are not available here\nsecond line")
    monkeypatch.setitem(generate._compiled, "cpu", broken)
    with pytest.warns(UserWarning, match="compiled decode step failed .RuntimeError: CUDA graphs are not available"):
        assert m.generate(None, ids, mask, max_new_tokens=8, num_beams=3, compile=True) == eager
    assert generate._compiled["cpu"] is generate.decode_one_token  # once: later calls go eager directly


def test_generation_under_autocast_caches_in_the_autocast_dtype(tmp_path):
    # train.py evaluates under torch.autocast: fp32 weights on a CPU, bf16 keys and values
    m = tiny_epalm(tmp_path, init_std=0.4)
    ids, mask = left_padded(ROWS)
    img = torch.randn(5, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for beams in (1, 3):
            out = m.generate(img, ids, mask, max_new_tokens=5, num_beams=beams, eos_token_id=-1)
            assert [len(r) for r in out] == [5] * 5
