"""metrics.py against pycocoevalcap's Bleu/Cider scorers (random caption sets) and hand-checked VQA/PTB cases."""
import contextlib
import io
import json
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from conftest import TESTDATA
import metrics

VOCAB = "a dog cat man on the red ball sits runs with grass".split()


def random_caption(rng, max_words):
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(0, max_words)))


def random_caption_set(seed):
    rng = random.Random(seed)
    n_images = rng.choice([1, 2, 5, 17, 40])
    refs = {f"img{i}": [random_caption(rng, 12) or "dog" for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    # every few images a hypothesis that is empty or a single word
    hyps = {k: [random_caption(rng, rng.choice([1, 1, 4, 14]))] for k in refs}
    return refs, hyps


def reference_scores(refs, hyps):
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        bleu_ref, _ = Bleu(4).compute_score(refs, hyps)
    cider_ref, _ = Cider().compute_score(refs, hyps)
    return bleu_ref, float(cider_ref)


@pytest.mark.parametrize("seed", range(12))
def test_bleu_and_cider_match_pycocoevalcap(seed):
    refs, hyps = random_caption_set(seed)
    bleu_ref, cider_ref = reference_scores(refs, hyps)
    assert metrics.bleu(refs, hyps) == pytest.approx(bleu_ref, abs=1e-6, rel=0)
    assert metrics.cider(refs, hyps) == pytest.approx(cider_ref, abs=1e-6, rel=0)


def test_scores_of_corner_cases_match_pycocoevalcap():
    cases = [
        ({1: ["a dog on the grass", "a dog"]}, {1: ["a dog on the grass"]}),           # one image: CIDEr 0
        ({1: ["a dog runs"], 2: ["a cat sits", "the cat"]}, {1: [""], 2: ["cat"]}),    # empty and 1-word hyps
        ({1: ["red ball", "a red ball"], 2: ["dog"], 3: ["a man with a dog"]},
         {1: ["red ball"], 2: [""], 3: ["a man with a dog"]}),
        ({1: ["a a a a"], 2: ["the dog the dog"]}, {1: ["a a a a a a a a"], 2: ["the the the"]}),  # clipping
    ]
    for refs, hyps in cases:
        bleu_ref, cider_ref = reference_scores(refs, hyps)
        assert metrics.bleu(refs, hyps) == pytest.approx(bleu_ref, abs=1e-6, rel=0)
        assert metrics.cider(refs, hyps) == pytest.approx(cider_ref, abs=1e-6, rel=0)
    assert metrics.cider(*cases[0]) == 0.0
    assert metrics.bleu(*cases[0])[0] == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_tokenise_then_score():
    refs_raw = {1: ["A man's dog, running.", "The dog (a puppy) runs!"], 2: ["Two cats; sleeping.", "Cats don't move."],
                3: ["A red ball.", "A ball that's red."]}
    hyps_raw = {1: "a man's dog running", 2: ["Cats sleeping..."], 3: "A \"red\" ball"}
    refs_tok = {1: ["a man 's dog running", "the dog -lrb- a puppy -rrb- runs"],
                2: ["two cats sleeping", "cats do n't move"], 3: ["a red ball", "a ball that 's red"]}
    hyps_tok = {1: ["a man 's dog running"], 2: ["cats sleeping"], 3: ["a red ball"]}
    bleu_ref, cider_ref = reference_scores(refs_tok, hyps_tok)
    scores = metrics.caption_scores(refs_raw, hyps_raw)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"]
    assert [scores[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(bleu_ref, abs=1e-6, rel=0)
    assert scores["CIDEr"] == pytest.approx(cider_ref, abs=1e-6, rel=0)


@pytest.mark.parametrize("text, expected", [
    ("A man's dog, running.", "a man 's dog running"),
    ("The kids don't like it.", "the kids do n't like it"),
    ("He can't and won't; she cannot!", "he ca n't and wo n't she can not"),
    ('A "big" dog -- on the grass...', "a big dog on the grass"),
    ("The dogs' bowl is 5% full: $3.50 or 1,000?", "the dogs bowl is 5 % full $ 3.50 or 1,000"),
    ("A T-shirt at 10:30 o'clock", "a t-shirt at 10:30 o'clock"),
    ("Mr. Smith in the U.S.", "mr. smith in the u.s."),
    ("A cat (black) sits.", "a cat -lrb- black -rrb- sits"),  # Java lowercases -LRB-, so the filter keeps it
    ("  Two\nlines ", "two lines"),
    ("\u201cIt\u2019s a \u2018dog\u2019\u201d", "it 's a dog"),
    ("", ""),
])
def test_ptb_tokenize_follows_ptb_rules(text, expected):
    assert metrics.ptb_tokenize(text) == expected


def test_bad_caption_input_names_the_problem():
    with pytest.raises(ValueError, match="only in hyps"):
        metrics.bleu({1: ["a dog"]}, {2: ["a dog"]})
    with pytest.raises(ValueError, match=r"hyps\[1\]"):
        metrics.cider({1: ["a dog"], 2: ["cat"]}, {1: ["a dog", "two"], 2: ["cat"]})
    with pytest.raises(ValueError, match=r"refs\[1\]"):
        metrics.bleu({1: []}, {1: ["a dog"]})


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("a dog", "dog"), ("The Dog.", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("y'alld've", "y'all'd've"),
    ("3.5", "3.5"), ("yes.", "yes"), ("1,000", "1000"),                         # period strip, digit,digit rule
    ("red,white", "red white"), ("red, white", "red white"), ("t-shirt", "t shirt"),  # punctuation -> space or gone
    ("well - known", "well known"), ("on/off", "on off"), ("(yes)", "yes"), ("what?!", "what"),
    ("1,000 t-shirts", "1000 tshirts"),  # a digit,digit anywhere deletes every punctuation mark
    ("  Ten\tdogs\n", "10 dogs"), ("it's", "it's"), ("im", "im"), ("twas", "'twas"),
])
def test_normalize_answer_follows_the_vqa_script(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_vqa_accuracy_hand_checked():
    others = ["dog", "cat", "bird", "fish", "cow", "horse", "sheep"]
    # leave-one-out over 10 humans: 3 matches -> (3 * 2/3 + 7 * 1) / 10; 4 or more -> 1
    assert metrics.vqa_accuracy("2", ["two"] * 3 + others) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("2", ["two"] * 4 + others[:6]) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("2", ["two", "2"] + others + ["3"]) == pytest.approx(0.6)  # (2*1/3 + 8*2/3) / 10
    assert metrics.vqa_accuracy("2", ["two"] + others + ["3", "4"]) == pytest.approx(0.3)  # (0 + 9/3) / 10
    assert metrics.vqa_accuracy("zebra", ["two"] * 10) == 0.0
    assert metrics.vqa_accuracy("Dont", ["don't"] * 10) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("a dog", ["dog"] * 5 + others[:5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="answers is empty"):
        metrics.vqa_accuracy("dog", [])


def test_vqa_accuracy_on_vqav2_excerpt():
    annotations = json.loads((TESTDATA / "annotations" / "vqav2" / "annotations.json").read_text())["annotations"]
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    # question 458752000: net x7, netting, mesh, pitcher, orange; 458752001: pitcher x9, catcher; 458752002: orange x10
    expected = {(458752000, "net"): 1.0, (458752000, "Netting"): 0.3, (458752000, "the mesh."): 0.3,
                (458752000, "ball"): 0.0, (458752001, "pitcher"): 1.0, (458752001, "Catcher"): 0.3,
                (458752001, "orange"): 0.0, (458752002, "Orange."): 1.0}
    for (question, prediction), value in expected.items():
        assert metrics.vqa_accuracy(prediction, answers[question]) == pytest.approx(value), (question, prediction)


def test_exact_match_after_normalisation():
    assert metrics.exact_match("Yes.", "yes") == 1.0
    assert metrics.exact_match("the left one", "left one") == 1.0
    assert metrics.exact_match("three", "3") == 1.0
    assert metrics.exact_match("left", "right") == 0.0
    assert metrics.exact_match("t-shirt", "tshirt") == 0.0  # "-" becomes a space, not nothing
