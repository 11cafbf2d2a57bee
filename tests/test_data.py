"""data.py: the feature cache, undecodable media, the text layout, seeded augmentation."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import TESTDATA
from media import ImageTransform


def test_feature_cache_reuses_unchanged_media_and_recomputes_changed(tmp_path):
    class Encoder:  # counts how often the frozen encoder really runs
        calls = 0

        def encode(self, x):
            Encoder.calls += 1
            return x.mean(dim=(2, 3))[:, None, :].repeat(1, 2, 1)

    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        im.save(files[-1])
    tf = data.MediaTransform("image", image=ImageTransform(resize=(8, 8)))
    for media in (images, files):
        examples = [data.Example(str(i), m) for i, m in enumerate(media)]
        Encoder.calls = 0
        a = data.cached_features(Encoder(), examples, tf, tmp_path / "cache", "enc", batch_size=2)
        b = data.cached_features(Encoder(), examples, tf, tmp_path / "cache", "enc", batch_size=2)
        assert Encoder.calls == 2 and torch.equal(a, b)  # the second call read the cache
        if media is images:
            examples[1].media = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
        else:
            time.sleep(0.01)
            Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(files[1])
        c = data.cached_features(Encoder(), examples, tf, tmp_path / "cache", "enc", batch_size=2)
        assert Encoder.calls == 4 and not torch.equal(c[1], a[1]) and torch.equal(c[0], a[0])
        data.cached_features(Encoder(), examples, tf, tmp_path / "cache", "other encoder", batch_size=2)
        assert Encoder.calls == 6


def test_undecodable_media_are_dropped_with_one_line_each(tmp_path, capfd):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (8, 8), "red").save(good)
    bad.write_bytes(b"not an image at all")
    examples = [data.Example("0", good, "", "a red square"), data.Example("1", bad, "", "oops")]
    tok = __import__("opt").load_tokenizer(str(TESTDATA / "tokenizer" / "opt"))
    ds = data.ExampleDataset(examples, data.MediaTransform("image", image=ImageTransform(resize=(8, 8))))
    batch = data.Collate(examples, tok)([ds[0], ds[1]])
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg" in err[0] and err[0].startswith("warning: skipped")
    assert batch["index"] == [0] and batch["dropped"] == 1 and batch["media"].shape == (1, 3, 8, 8)


def test_text_batch_takes_eos_and_pad_from_the_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    def word_tokenizer(vocab):
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        bos = [("</s>", vocab["</s>"])]
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=bos)
        return tok

    # OPT's ids would be </s>=2, <pad>=1: here they are elsewhere, and 1, 2 are words
    vocab = {"<unk>": 0, "a": 1, "b": 2, "cat": 3, "</s>": 5, "<pad>": 7}
    ids, mask, targets = data.text_batch(word_tokenizer(vocab), ["a", "a b"], [" cat", " cat"])
    assert ids.tolist() == [[7, 5, 1, 3, 5], [5, 1, 2, 3, 5]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert targets.tolist() == [[-100, -100, -100, 3, 5], [-100, -100, -100, 3, 5]]
    opt = __import__("opt").load_tokenizer(str(TESTDATA / "tokenizer" / "opt"))
    ids, _, targets = data.text_batch(opt, ["", "a dog"], [" cat", " cat"])
    assert ids[0, 0] == 1 and targets[0, -1] == 2 == ids[1, 0]  # OPT: <pad> 1, </s> 2 (BOS and EOS)
    del vocab["<pad>"]
    with pytest.raises(ValueError, match="the tokenizer has no <pad> token"):
        data.text_batch(word_tokenizer(vocab), ["a"], [" cat"])


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_augmentation_is_a_function_of_seed_epoch_and_example(modality):
    """The same (seed, epoch, example) gives the same augmented tensor, in any process and any order; another
    epoch, seed or example gives another draw."""
    import toy
    media = [s["media"] for s in toy.samples(modality, "train", 2, seed=0)]
    examples = [data.Example(str(i), m) for i, m in enumerate(media)]
    image = ImageTransform(resize=(32, 32))
    tf = data.MediaTransform(modality, image=image, audio_frames=100, num_frames=4, train=True)
    ds = data.ExampleDataset(examples, tf, seed=7)
    first = ds[(0, 3)][1]
    assert torch.equal(first, ds[(0, 3)][1]) and torch.equal(first, data.ExampleDataset(examples, tf, seed=7)[(0, 3)][1])
    others = [ds[(0, 4)][1], data.ExampleDataset(examples, tf, seed=8)[(0, 3)][1]]
    assert all(not torch.equal(first, x) for x in others)
    plain = data.MediaTransform(modality, image=image, audio_frames=100, num_frames=4)
    assert torch.equal(data.ExampleDataset(examples, plain, seed=7)[(0, 3)][1], plain(media[0]))  # no augment: as is
