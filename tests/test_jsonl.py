"""Your own data: the jsonl reader (benchmarks.read_jsonl through read_dataset), its one-line errors, the toy world
exported as files (toy.export) and a short train.py run on them.

References: the JSON Lines format (jsonlines.org); the expected examples are written by hand from the lines in
each test; the exported files are checked against the toy run's own examples (data.toy_examples) decoded
through the same media readers a user's files go through.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks
import data
import evaluate
import toy
from conftest import ROOT, TESTDATA
from model import load_backbones

PHOTO, WAV = TESTDATA / "images" / "hopper.jpg", TESTDATA / "audio" / "speech_16k_mono.wav"


def write_jsonl(path, *lines):
    """Each line a dict (written as JSON, any characters kept) or a raw string; a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x for x in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def place(source, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


@pytest.fixture
def root(tmp_path):
    place(PHOTO, tmp_path / "img" / "0001.jpg")
    place(WAV, tmp_path / "clips" / "a.wav")
    return tmp_path


def read(root, split="train", modality="image"):
    return benchmarks.read_dataset("jsonl", root, split, modality)


# ---- what a file holds ----

def test_captions_one_and_several_references_relative_and_absolute_paths(root, tmp_path_factory):
    elsewhere = place(PHOTO, tmp_path_factory.mktemp("elsewhere") / "photo.png.jpg")
    lines = [{"media": "img/0001.jpg", "caption": " a dog on a sofa "}, "", "   ",
             {"id": "b", "media": str(elsewhere), "captions": ["a cat", "a cat on a mat"]}]
    write_jsonl(root / "train.jsonl", *lines)
    write_jsonl(root / "val.jsonl", *lines)
    train = read(root, "train")
    assert [(e.id, e.prompt, e.target) for e in train] == [
        ("1_0", "", "a dog on a sofa"), ("b_0", "", "a cat"), ("b_1", "", "a cat on a mat")]
    assert train[0].media == root / "img" / "0001.jpg" and train[1].media == elsewhere
    assert train[2].references == ["a cat", "a cat on a mat"]
    val = read(root, "val")  # evaluation: one example per media, every caption a reference
    assert [(e.id, e.target, e.references) for e in val] == [
        ("1", "a dog on a sofa", ["a dog on a sofa"]), ("b", "a cat", ["a cat", "a cat on a mat"])]
    assert benchmarks.dataset_task("jsonl", root) == "caption"


def test_questions_one_and_several_answers_and_their_scores(root):
    lines = [{"id": 7, "media": "clips/a.wav", "question": "what is making the sound?",
              "answers": ["a dog", "dog", "the cat", "a dog"]},
             {"media": "clips/a.wav", "question": "is it loud? ", "answer": "yes"},
             {"media": "clips/a.wav", "question": "who?", "answer": "a man", "answers": ["a woman", "a woman"]}]
    write_jsonl(root / "train.jsonl", *lines)
    write_jsonl(root / "test.jsonl", *lines)
    for split in ("train", "test"):
        examples = read(root, split, "audio")
        assert [(e.id, e.prompt, e.target, e.references) for e in examples] == [
            ("7", "what is making the sound? </a>", " a dog", ["a dog", "dog", "the cat", "a dog"]),
            ("2", "is it loud? </a>", " yes", ["yes"]),
            ("3", "who? </a>", " a man", ["a woman", "a woman"])]
    assert benchmarks.dataset_task("jsonl", root) == "vqa"
    cfg = evaluate.EvalConfig("vqa", "jsonl", "audio")
    # VQA accuracy, min(1, matches / 3) averaged over the leave-one-out subsets: "dog" matches 3 of the 4 humans
    # (articles dropped), 2 in three subsets and 3 in one: (3 * 2/3 + 1) / 4; "a woman" matches 1 human in each
    # of the 2 subsets: 1/3. "Yes." against the single "yes": exact match after normalisation, 1.
    scores = evaluate.score(examples, {"7": "dog", "2": "Yes.", "3": "a woman"}, cfg)
    assert scores["accuracy"] == pytest.approx(((3 * 2 / 3 + 1) / 4 + 1 + 1 / 3) / 3)


def test_any_characters_round_trip(root):
    captions = ["un chien sur un canapé", "一只狗在沙发上", "собака 🐕", "a line\u2028separator and\u0085NEL",
                'quote " \\ tab\there']
    text = "\ufeff" + "\r\n".join(json.dumps({"media": "img/0001.jpg", "caption": c}, ensure_ascii=k % 2 == 0)
                                  for k, c in enumerate(captions)) + "\r\n"
    (root / "train.jsonl").write_bytes(text.encode("utf-8"))  # a BOM and CRLF, as some editors write
    assert [e.target for e in read(root)] == captions


def test_a_wav_under_another_suffix_is_read_as_the_audio_reader_reads_it(root):
    place(WAV, root / "clips" / "b.dat")
    write_jsonl(root / "train.jsonl", {"media": "clips/b.dat", "caption": "speech"})
    assert read(root, modality="audio")[0].media == root / "clips" / "b.dat"


def test_a_folder_of_frames_is_a_video(root):
    for k in range(3):
        place(PHOTO, root / "clip" / f"{k}.jpg")
    write_jsonl(root / "train.jsonl", {"media": "clip", "caption": "frames"})
    assert read(root, modality="video")[0].media == root / "clip"


# ---- bad input: one line naming the file and the line ----

def error_of(root, split="train", modality="image"):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        read(root, split, modality)
    message = str(e.value)
    assert "\n" not in message, message
    return message


CAPTION = {"media": "img/0001.jpg", "caption": "a dog"}
BAD_LINES = [
    ('{"media": "img/0001.jpg", "caption": "a dog"', "line 2: not JSON (Expecting ',' delimiter"),
    ('["img/0001.jpg", "a dog"]', "line 2: expected a JSON object {...}, got list"),
    ({"caption": "a dog"}, "line 2: no field 'media'"),
    ({"media": "img/0001.jpg"}, "line 2: expected \"caption\"/\"captions\" (captioning) or \"question\""),
    ({"media": "img/0001.jpg", "caption": 3}, "line 2: field 'caption' must be a non-empty string, got 3"),
    ({"media": "img/0001.jpg", "caption": None}, "line 2: field 'caption' must be a non-empty string, got null"),
    ({"media": "img/0001.jpg", "caption": "  "}, "line 2: field 'caption' must be a non-empty string"),
    ({"media": 5, "caption": "a dog"}, "line 2: field 'media' must be a non-empty string, got 5"),
    ({"media": "img/0001.jpg", "captions": "a dog"}, "line 2: field 'captions' must be a non-empty list of"),
    ({"media": "img/0001.jpg", "captions": []}, "line 2: field 'captions' must be a non-empty list of"),
    ({"media": "img/0001.jpg", "caption": "a", "captions": ["b"]}, "line 2: give 'caption' or 'captions', not both"),
    ({"media": "img/0001.jpg", "caption": "a", "id": True}, "line 2: field 'id' must be a string or an integer"),
    ({"media": "img/0001.jpg", "caption": "a", "id": 1}, "line 2: id '1' is already the id of line 1"),
    ({"media": "img/0001.jpg", "question": "what?", "answer": "a dog"},
     "line 2: a question, but line 1 has captions: a data set holds one task"),
    ({"media": "img", "caption": "a dog"}, "line 2: media {root}/img is a folder"),
]


@pytest.mark.parametrize("line, words", BAD_LINES)
def test_bad_lines_name_file_and_line(root, line, words):
    path = write_jsonl(root / "train.jsonl", CAPTION, line)
    assert error_of(root).startswith(f"{path}: " + words.replace("{root}", str(root)))


def test_bad_questions_and_mixed_tasks_after_blank_lines(root):
    question = {"media": "clips/a.wav", "question": "what?"}
    path = write_jsonl(root / "train.jsonl", question)
    assert error_of(root, modality="audio") == f"{path}: line 1: a question needs 'answer' or 'answers'"
    write_jsonl(root / "train.jsonl", {**question, "answers": ["a", 2]})
    assert error_of(root, modality="audio").startswith(
        f"{path}: line 1: field 'answers' must be a non-empty list of non-empty strings, got [\"a\", 2]")
    write_jsonl(root / "train.jsonl", {**question, "answer": "a"}, "", CAPTION)
    assert error_of(root, modality="audio").startswith(f"{path}: line 3: a caption, but line 1 has questions")
    write_jsonl(root / "train.jsonl", CAPTION)  # val asks questions about a captioning data set
    val = write_jsonl(root / "val.jsonl", {**question, "answer": "a"})
    assert error_of(root, "val", "audio").startswith(f"{val}: line 1: a question, but {root / 'train.jsonl'} has "
                                                     "captions")


def test_not_utf8_empty_and_missing_splits(root):
    path = root / "train.jsonl"
    path.write_bytes(json.dumps(CAPTION).encode() + b'\n{"media": "img/0001.jpg", "caption": "caf\xe9"}\n')
    assert error_of(root).startswith(f"{path}: line 2: not UTF-8 text")
    write_jsonl(path, "", "  ")
    assert error_of(root) == f"{path}: no examples (the file is empty or blank)"
    write_jsonl(path, CAPTION)
    assert error_of(root, "test").startswith(f"{root / 'test.jsonl'}: missing jsonl annotation file")


@pytest.mark.parametrize("modality, name, words", [
    ("audio", "img/0001.jpg", "not a WAV file, and '.jpg' is not an audio format epalm reads: .wav .flac"),
    ("video", "img/0001.jpg", "'.jpg' is not a video format epalm reads: .mp4"),
    ("image", "notes.txt", "a text file, not an image (Pillow reads JPEG, PNG"),
    ("image", "clips/a.wav", None),  # a known suffix of another modality: Pillow is asked, and says no
])
def test_media_that_does_not_fit_the_modality_says_what_is_read(root, modality, name, words):
    (root / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = write_jsonl(root / "train.jsonl", {"media": name, "caption": "x"})
    words = words or "not an image or unsupported image format"
    assert error_of(root, modality=modality).startswith(f"{path}: line 1: {root / name}: {words}")


def test_missing_media_are_counted_and_skipped_up_to_one_percent(root):
    lines = [{"media": "img/0001.jpg", "caption": f"photo {k}"} for k in range(150)]
    lines[6] = {"media": "img/gone.jpg", "caption": "gone"}
    path = write_jsonl(root / "train.jsonl", *lines)
    with pytest.warns(UserWarning, match=r"skipped 1 of 150 lines whose media file does not exist, the first on "
                                         r"line 7: img/gone.jpg"):
        examples = read(root)
    assert len(examples) == 149 and "gone" not in [e.target for e in examples]
    write_jsonl(path, *lines[:8], {"media": "/nowhere/x.jpg", "caption": "gone too"}, *lines[8:10])
    with pytest.warns(UserWarning, match="skipped 2 of 11 lines"), pytest.raises(ValueError) as e:
        read(root)  # a ValueError: train.py says it in one line (configurator.run)
    assert str(e.value).startswith(f"more than 1% of the media files named in {path} failed") and \
        "(2 of 11)" in str(e.value)


# ---- the toy world as files ----

@pytest.mark.parametrize("modality, task", [("image", "caption"), ("audio", "vqa"), ("video", "caption")])
def test_exported_files_read_back_as_the_toy_runs_examples(tmp_path, modality, task):
    toy.export(tmp_path, modality, task, train_samples=5, heldout_samples=3, seed=11)
    encoder = load_backbones(modality, str(toy.TOY_DIR / "lm"), str(toy.encoder_dir(modality)))[2]
    transform = data.MediaTransform.for_encoder(modality, encoder)
    for split, toy_split, seed in (("train", "train", 11), ("val", "heldout", 12)):
        ours = benchmarks.read_dataset("jsonl", tmp_path, split, modality)
        reference = data.toy_examples(modality, task, toy_split, len(ours), seed)
        assert len(ours) == {"train": 5, "val": 3}[split]
        assert [(e.prompt, e.target, e.references) for e in ours] == \
            [(e.prompt, e.target, e.references) for e in reference]
        for e, r in zip(ours, reference):
            x, y = transform(e.media), transform(r.media)
            if modality == "audio":  # 16-bit PCM: within one quantisation step of the rendered wave
                assert np.abs(data.load_audio(e.media).numpy() - np.asarray(r.media)).max() <= 1 / 32768 + 1e-7
                assert torch.allclose(x, y, atol=0.02)
            else:  # PNG is lossless
                assert torch.equal(x, y)


@pytest.mark.slow
def test_toy_export_then_a_short_train_run_on_the_files(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder, out = tmp_path / "audio", tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "toy.py"), "--export", str(folder), "--modality", "audio",
                        "--train_samples", "40", "--heldout_samples", "6"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len((folder / "train.jsonl").read_text().splitlines()) == 40 and len(list(folder.glob("val/*.wav"))) == 6
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "jsonl", "--data_dir", str(folder), "--modality",
           "audio", "--max_iters", "6", "--eval_interval", "6", "--batch_size", "8", "--blind_control", "False",
           "--out_dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["items"] == 6 and "CIDEr" in results["scores"]
    config = results["config"]  # the task from the files, the toy backbones' recipe (toy.train_preset)
    assert config["task"] == "caption" and config["num_levels"] == 2 and config["cache_features"] is True
    assert "held-out, val split" in p.stdout
    write_jsonl(folder / "val.jsonl", {"media": "val/0000.wav", "caption": "x"}, "not json")
    p = subprocess.run(cmd + ["--eval_only"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 1 and p.stderr.strip() == f"error: {folder / 'val.jsonl'}: line 2: not JSON (Expecting " \
        "value: line 1 column 1 (char 0))", p.stderr[-3000:]
