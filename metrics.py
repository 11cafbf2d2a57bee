"""Caption and VQA scores without Java: PTB-style tokenisation, BLEU-1..4, CIDEr-D, VQA accuracy, exact match.

References:
- BLEU and CIDEr-D as computed by the COCO caption evaluation code (pycocoevalcap: bleu/bleu_scorer.py with
  "closest" reference length, cider/cider_scorer.py with sigma 6); Papineni et al. 2002, Vedantam et al. 2015.
- Tokenisation: pycocoevalcap runs Stanford CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase` and then drops
  punctuation tokens. `ptb_tokenize` here is a pure-Python APPROXIMATION of that (it covers what captions contain:
  punctuation, clitics, quotes, brackets, numbers, hyphenated words, a few abbreviations), not a port of the lexer.
- VQA accuracy: the official VQA evaluation script (github.com/GT-Vision-Lab/VQA, vqaEval.py), answer
  normalisation included. GQA: exact match after the same normalisation.
"""
import math
import re
from collections import Counter

# --------------------------------------------------------------------------- tokenisation

# tokens pycocoevalcap's PTBTokenizer removes after the Java tokeniser (case-sensitive, as there)
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                   ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# Java lowercases AFTER escaping brackets, so "(" comes out as "-lrb-", which the case-sensitive filter keeps
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
PTB_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "mt")
PTB_TOKEN = re.compile(
    r"(?:[a-z]\.){2,}"                                    # acronyms keep their periods: u.s. e.g.
    r"|\b(?:" + "|".join(PTB_ABBREVIATIONS) + r")\.(?=\s|$)"  # so do common abbreviations: mr. st.
    r"|\d+(?:[.,:/]\d+)+"                                 # numbers keep inner separators: 1,000 3.5 10:30 1/2
    r"|\w+(?:[-'&/.]\w+)*"                                # words, hyphenated words, o'clock, at&t, and/or
    r"|\.\.\.|--|\S")                                     # ellipsis, double dash, any other single character
PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")
PTB_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                   "gimme": "gim me", "lemme": "lem me"}


def ptb_tokenize(text: str) -> str:
    """Lowercased, space-joined PTB tokens of `text` without pycocoevalcap's punctuation tokens.
    "A man's dog, running." -> "a man 's dog running"."""
    text = text.lower().replace("\n", " ").replace("\u2018", "'").replace("\u2019", "'")
    text = re.sub("[\"\u201c\u201d\u00ab\u00bb]", " ", text)  # double quotes only ever become `` or '', both dropped
    tokens = []
    for token in PTB_TOKEN.findall(text):
        clitic = PTB_CLITIC.match(token)
        if token in PTB_SPLIT_WORDS:
            tokens += PTB_SPLIT_WORDS[token].split()
        elif clitic:
            tokens += [clitic.group(1), clitic.group(2)]
        else:
            tokens.append(PTB_BRACKETS.get(token, token))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


# --------------------------------------------------------------------------- BLEU and CIDEr-D

def ngram_counts(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def check_pairs(refs: dict, hyps: dict) -> list:
    if refs.keys() != hyps.keys():
        raise ValueError(f"refs and hyps must have the same ids; only in refs: {sorted(set(refs) - set(hyps), key=str)[:5]}, "
                         f"only in hyps: {sorted(set(hyps) - set(refs), key=str)[:5]}")
    if not refs:
        raise ValueError("refs is empty: nothing to score")
    for key in refs:
        if not isinstance(hyps[key], (list, tuple)) or len(hyps[key]) != 1:
            raise ValueError(f"hyps[{key!r}] must be a list with exactly one caption, got {hyps[key]!r}")
        if not isinstance(refs[key], (list, tuple)) or len(refs[key]) == 0:
            raise ValueError(f"refs[{key!r}] must be a non-empty list of captions, got {refs[key]!r}")
    return list(refs)


def bleu(refs: dict, hyps: dict, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions, as pycocoevalcap's Bleu(4).compute_score: clipped n-gram
    matches and n-gram counts summed over the corpus, per-sentence closest reference length."""
    correct, guess, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for key in check_pairs(refs, hyps):
        hyp = hyps[key][0]
        length = len(hyp.split())
        max_ref_counts = Counter()
        for ref in refs[key]:
            max_ref_counts |= ngram_counts(ref, n)  # | keeps the max count per n-gram
        for gram, count in ngram_counts(hyp, n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(n):
            guess[k] += max(0, length - k)
        # closest reference length, the shorter one on a tie
        ref_len += min((abs(len(r.split()) - length), len(r.split())) for r in refs[key])[1]
        hyp_len += length
    scores, product = [], 1.0
    for k in range(n):
        # the same tiny/small guards as pycocoevalcap, so zero matches give ~0 rather than a division error
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + 1e-15) / (ref_len + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * brevity for s in scores]


def cider(refs: dict, hyps: dict, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D of tokenised captions, as pycocoevalcap's Cider().compute_score: tf-idf n-gram vectors
    with document frequencies from the references of the evaluated set, clipped cosine, Gaussian length
    penalty, mean over n = 1..4 and over references, times 10, mean over images."""
    keys = check_pairs(refs, hyps)
    doc_freq = Counter(gram for key in keys for gram in set().union(*(ngram_counts(r, n) for r in refs[key])))
    log_images = math.log(len(keys))

    def tfidf(sentence):
        counts = ngram_counts(sentence, n)
        vec = {gram: tf * (log_images - math.log(max(1.0, doc_freq[gram]))) for gram, tf in counts.items()}
        norms = [math.sqrt(sum(w * w for g, w in vec.items() if len(g) == k + 1)) for k in range(n)]
        # pycocoevalcap's length counts bigrams (its `if n == 1` tests a 0-based index): the same differences
        # as word counts, except next to an empty caption, whose similarity is 0 whatever the penalty
        return vec, norms, len(sentence.split())

    total = 0.0
    for key in keys:
        vec, norms, length = tfidf(hyps[key][0])
        per_n = [0.0] * n
        for ref in refs[key]:
            ref_vec, ref_norms, ref_length = tfidf(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in vec.items() if len(g) == k + 1)
                if norms[k] != 0 and ref_norms[k] != 0:
                    dot /= norms[k] * ref_norms[k]
                per_n[k] += dot * penalty
        total += sum(per_n) / n / len(refs[key]) * 10.0
    return total / len(keys)


def caption_scores(refs_raw: dict, hyps_raw: dict) -> dict:
    """PTB-tokenise raw captions and score them: {"BLEU-1".."BLEU-4", "CIDEr"} on pycocoevalcap's scale
    (BLEU in [0, 1], CIDEr ~1.0 for a good COCO model; multiply by 100 for paper tables).
    refs_raw: {id: [caption, ...]}, hyps_raw: {id: caption or [caption]}."""
    refs = {k: [ptb_tokenize(c) for c in v] for k, v in refs_raw.items()}
    hyps = {k: [ptb_tokenize(c) for c in ([v] if isinstance(v, str) else v)] for k, v in hyps_raw.items()}
    scores = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(refs, hyps))}
    scores["CIDEr"] = cider(refs, hyps)
    return scores


# --------------------------------------------------------------------------- VQA accuracy and exact match

VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = {"a", "an", "the"}
# The official map sends each contraction written with one apostrophe missing to its full form ("dont" ->
# "don't", "couldnt've" -> "couldn't've"); it is generated here from the full forms. Its capitalised "I" entries
# never fire (text is lowercased first), so "i'm" & co are absent, as are "let's" and "she's" (identity there).
VQA_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
VQA_CONTRACTIONS = {full[:i] + full[i + 1:]: full for full in VQA_CONTRACTED for i, c in enumerate(full) if c == "'"}
VQA_DIGIT_COMMA = re.compile(r"\d,\d")
VQA_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its own)


def normalize_answer(s: str) -> str:
    """The VQA script's answer normalisation: punctuation, periods, lowercase, number words, articles, contractions."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    text = s
    for p in VQA_PUNCTUATION:
        # punctuation next to a space, or any punctuation in a text with a digit,digit, is deleted; else -> space
        # (the tests look at the text before any replacement, as the script does)
        text = text.replace(p, "" if (p + " " in s or " " + p in s or VQA_DIGIT_COMMA.search(s)) else " ")
    text = VQA_PERIOD.sub("", text)
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: min(#humans who gave the prediction / 3, 1), averaged over the leave-one-out subsets of the
    (usually 10) human answers. Deviation: both sides are always normalised (the script normalises only the
    prediction, and only when the humans disagree; VQAv2 human answers are already normalised)."""
    if not answers:
        raise ValueError("vqa_accuracy: answers is empty, need the human answers of the question")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one question: 1.0 if the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))
