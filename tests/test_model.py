"""eP-ALM (model.py): injection, masking, freezing, generation; transformers' OPT as the reference."""
import pytest
import torch
import transformers

from model import EPALM, EPALMConfig, injection_window
from opt import OPT, OPTConfig
from vit import ViT, ViTConfig

VOCAB = 64


def tiny_lm(tmp_path, seed=0, layers=4, post_ln=False, init_std=0.02):
    """A random tiny OPT in the hub layout, loaded by our loader; also returns transformers' model."""
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 do_layer_norm_before=not post_ln, init_std=init_std, dropout=0.0,
                                 pad_token_id=1, bos_token_id=2, eos_token_id=2)
    ref = transformers.OPTForCausalLM(cfg).eval()
    if init_std > 0.1:  # peaked distributions: beam search and greedy have no near-ties to break differently
        with torch.no_grad():
            for p in ref.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    path = tmp_path / f"opt{seed}"
    ref.save_pretrained(path)
    return OPT.from_pretrained(str(path)), ref


def tiny_encoder(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = ViTConfig.from_dict(dict(hidden_size=24, num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=48, image_size=16, patch_size=8))
    return ViT(cfg).eval()


def tiny_epalm(tmp_path, prompt_length=3, num_levels=2, shared=True, **kw):
    lm, _ = tiny_lm(tmp_path, **kw)
    torch.manual_seed(1)
    return EPALM(lm, tiny_encoder(layers=3), EPALMConfig(num_levels=num_levels, prompt_length=prompt_length,
                                                       shared_connector=shared))


def left_padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[1] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_injection_window_scales_and_checks():
    assert injection_window(32, 6) == (19, 31)  # OPT-2.7B: the official window
    s, e = injection_window(12, 6)
    assert e - s >= 6 and e <= 12
    with pytest.raises(ValueError, match="window"):
        injection_window(4, 6)


@pytest.mark.slow
def test_no_future_leak_with_media_prompt_and_left_padding(tmp_path):
    m = tiny_epalm(tmp_path)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    ids, mask = left_padded([[2, 5, 6, 7, 8, 9], [2, 11, 12, 13]])
    logits, _ = m(img, ids, mask)
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(4, VOCAB, changed[:, t + 1:].shape)
        new_logits, _ = m(img, changed, mask)
        real = mask[:, :t + 1].bool()
        torch.testing.assert_close(new_logits[:, :t + 1][real], logits[:, :t + 1][real], atol=1e-5, rtol=0)


def test_left_padding_gives_same_logits_as_no_padding(tmp_path):
    m = tiny_epalm(tmp_path)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    rows = [[2, 5, 6, 7, 8, 9], [2, 11, 12, 13]]
    ids, mask = left_padded(rows)
    batched, _ = m(img, ids, mask)
    for b, r in enumerate(rows):
        alone, _ = m(img[b:b + 1], torch.tensor([r]))
        torch.testing.assert_close(batched[b, -len(r):], alone[0], atol=1e-5, rtol=0)


def reference_forward(m, feats, ids):
    """The method written out for one unpadded sample, layer by layer, with plain causal attention."""
    lm, P = m.lm, m.config.prompt_length
    inj = torch.stack([m.connector[0 if len(m.connector) == 1 else k](feats[k])
                       for k in range(m.config.num_levels)])
    h = lm.project_in(torch.cat([m.prompt_vectors(), lm.embed_tokens(ids)]))
    h = h + torch.cat([torch.zeros(P, h.shape[1]), lm.embed_positions(torch.arange(len(ids)) + 2)])
    width, K = m.end - m.start, m.config.num_levels
    for i, layer in enumerate(lm.layers):
        level = [k for k in range(K) if m.start + (k * width) // K == i]
        if i == m.start:
            h = torch.cat([inj[0][None], h])
        elif level:
            h = torch.cat([inj[level[0]][None], h[1:]])
        h = layer(h[None], None)[0]
    return lm.logits(h[None, -len(ids):])[0]


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_injection_matches_the_method_written_out(tmp_path, shared):
    m = tiny_epalm(tmp_path, num_levels=2, shared=shared, layers=6)
    assert (m.start, m.end) == injection_window(6, 2)
    torch.manual_seed(0)
    img = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    logits, _ = m(img, ids)
    ref = reference_forward(m, m.encode(img)[0], ids[0])
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)
    # every level matters: changing the deepest level's token changes the logits
    feats = m.encode(img)
    feats2 = feats.clone()
    feats2[:, -1] += 1.0
    assert not torch.allclose(m(None, ids, features=feats2)[0], logits, atol=1e-4)


def test_features_path_equals_media_path(tmp_path):
    m = tiny_epalm(tmp_path)
    img = torch.randn(2, 3, 16, 16)
    ids, mask = left_padded([[2, 5, 6, 7], [2, 8, 9]])
    a, _ = m(img, ids, mask)
    b, _ = m(None, ids, mask, features=m.encode(img))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert m.encode(img).shape == (2, 2, 24)


def test_only_connector_and_prompt_learn(tmp_path):
    m = tiny_epalm(tmp_path)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("lm.", "encoder."))}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"prompt", "connector.0.weight", "connector.0.bias"}
    assert m.media_tokens == 1  # OPT: one token per level, as in eP-ALM
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    img = torch.randn(2, 3, 16, 16)
    ids, mask = left_padded([[2, 5, 6, 7], [2, 8, 9]])
    targets = ids.masked_fill(mask == 0, -100)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    _, loss = m(img, ids, mask, targets)
    loss.backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    for n, p in m.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
    for k, v in m.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    m.train()
    assert not m.lm.training and not m.encoder.training and m.training


def test_loss_is_next_token_cross_entropy_on_supervised_positions(tmp_path):
    m = tiny_epalm(tmp_path)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    targets = torch.tensor([[-100, -100, 6, 7, 8]])
    logits, loss = m(None, ids, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:4], torch.tensor([6, 7, 8]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("post_ln", [False, True])
def test_without_prompt_and_media_it_is_plain_opt(tmp_path, post_ln):
    lm, ref = tiny_lm(tmp_path, post_ln=post_ln)
    m = EPALM(lm, tiny_encoder(), EPALMConfig(num_levels=2, prompt_length=0))
    ids, mask = left_padded([[2, 5, 6, 7, 8], [2, 9, 10]])
    ours, _ = m(None, ids, mask)
    theirs = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def hf_new_tokens(ref, ids, mask, **kw):
    out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=1, eos_token_id=2, **kw)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[:r.index(2)] if 2 in r else r for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_and_beam_search_match_transformers(tmp_path, seed):
    lm, ref = tiny_lm(tmp_path, seed=seed, init_std=0.4)
    m = EPALM(lm, tiny_encoder(), EPALMConfig(num_levels=2, prompt_length=0))
    ids, mask = left_padded([[2, 5, 6, 7, 8], [2, 9, 10], [2, 30 + seed]])
    ours = m.generate(None, ids, mask, max_new_tokens=12)
    assert ours == hf_new_tokens(ref, ids, mask, max_new_tokens=12, num_beams=1)
    ours = m.generate(None, ids, mask, max_new_tokens=12, num_beams=3, length_penalty=1.0)
    theirs = hf_new_tokens(ref, ids, mask, max_new_tokens=12, num_beams=3, length_penalty=1.0,
                           early_stopping=True)
    assert ours == theirs


@pytest.mark.slow
def test_cached_generation_equals_uncached_argmax(tmp_path):
    m = tiny_epalm(tmp_path, init_std=0.4)
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    ids, mask = left_padded([[2, 5, 6, 7], [2, 8]])
    cached = m.generate(img, ids, mask, max_new_tokens=8, eos_token_id=-1)
    for b in range(2):
        seq = ids[b:b + 1][mask[b:b + 1].bool()][None]
        for _ in range(8):
            logits, _ = m(img[b:b + 1], seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert cached[b] == seq[0, -8:].tolist()


@pytest.mark.slow
def test_sampling_respects_top_k(tmp_path):
    m = tiny_epalm(tmp_path)
    ids = torch.tensor([[2, 5, 6]])
    logits, _ = m(None, ids)
    allowed = set(logits[0, -1].topk(2).indices.tolist())
    torch.manual_seed(0)
    firsts = {m.generate(None, ids, max_new_tokens=1, temperature=1.0, top_k=2, eos_token_id=-1)[0][0]
              for _ in range(20)}
    assert firsts <= allowed


def test_trainable_fraction_of_pt_l_recipe_is_tiny():
    """OPT-6.7B + ViT-L, one shared connector, 10 plain prompt vectors (meta device, no weights).

    Counting each parameter once gives 0.061%; the paper's "< 0.06%" holds when the LM head, tied to the
    token embedding, is counted as a separate matrix (6.97B + 0.21B parameters)."""
    with torch.device("meta"):
        m = EPALM(OPT(OPTConfig.from_name("opt-6.7b")), ViT(ViTConfig.from_name("vit-large-patch16-224")),
                  EPALMConfig())
    n = sum(p.numel() for p in m.trainable_parameters())
    total = sum(p.numel() for p in m.parameters())
    assert n == 1024 * 4096 + 4096 + 10 * 4096
    assert total == 6_658_473_984 + 303_301_632 + n  # transformers' OPTModel and ViTModel (no pooler) counts
    assert 0.0006 < n / total < 0.00061
    assert n / (total + 50272 * 4096) < 0.0006
    assert m.parameter_report() == f"trainable: {n:,} (0.061% of {total:,})"


def test_mlp_reparametrised_prompt_trains_through_the_mlp(tmp_path):
    lm, _ = tiny_lm(tmp_path)
    m = EPALM(lm, tiny_encoder(), EPALMConfig(num_levels=2, prompt_length=3, prompt_mlp=True, prompt_mlp_hidden=8))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"prompt", "prompt_mlp.0.weight", "prompt_mlp.2.weight"} <= trainable
    ids = torch.tensor([[2, 5, 6, 7]])
    _, loss = m(torch.randn(1, 3, 16, 16), ids, targets=ids)
    loss.backward()
    assert m.prompt_mlp[0].weight.grad.abs().sum() > 0 and m.prompt.grad.abs().sum() > 0
    # the MLP's output, not the raw vectors, is what the LM sees
    torch.testing.assert_close(m.prompt_vectors(), m.prompt_mlp(m.prompt))
    assert not torch.allclose(m.prompt_vectors(), m.prompt)
