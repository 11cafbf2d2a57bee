"""configurator.py: the command line as people type it (`--key value`, `--key=value`, bare switches, lists, JSON
files) and one-line errors for what it cannot take."""
import json

import pytest

import configurator

DEFAULTS = {"modality": "image", "max_iters": 20000, "lr": 2e-4, "eval_only": False, "compile": True,
            "inject_start": None, "image": [], "num_beams": 1, "out_dir": ""}


def parse(*argv):
    return configurator.overrides(list(argv), DEFAULTS)


def error_of(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


def test_space_and_equals_forms_are_the_same():
    assert parse("--modality", "audio") == parse("--modality=audio") == {"modality": "audio"}
    assert parse("--max_iters", "200", "--lr", "1e-3") == {"max_iters": 200, "lr": 1e-3}
    assert parse("--max-iters", "200") == {"max_iters": 200}  # dashes as in most command-line tools
    assert parse("--lr", "3") == {"lr": 3.0} and isinstance(parse("--lr", "3")["lr"], float)
    assert parse("--lr", "-1e-3") == {"lr": -1e-3}  # a negative number is a value, not a flag
    assert parse("--inject_start", "12") == {"inject_start": 12} and parse("--inject_start=None") == {
        "inject_start": None}
    assert parse("--out_dir", "runs/a b") == {"out_dir": "runs/a b"}


def test_booleans_bare_or_with_a_value():
    assert parse("--eval_only") == {"eval_only": True}
    assert parse("--compile", "False") == {"compile": False} == parse("--compile=false")
    assert parse("--eval_only", "--modality", "audio") == {"eval_only": True, "modality": "audio"}
    assert "expected True or False" in error_of("--compile=1")


def test_bare_arguments_are_json_files(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"max_iters": 50, "modality": "video", "lr": 1}))
    # a bare switch does not swallow the file after it; flags win over files
    assert parse("--eval_only", str(f), "--max_iters", "7") == {"eval_only": True, "max_iters": 7,
                                                                 "modality": "video", "lr": 1.0}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such": 1}))
    assert "unknown setting --no_such" in error_of(str(bad))
    assert "config file" in error_of(str(tmp_path / "missing.json"))


def test_lists_take_every_value_up_to_the_next_flag():
    assert parse("--image", "a.jpg", "b.png", "--num_beams", "3") == {"image": ["a.jpg", "b.png"], "num_beams": 3}
    assert parse("--image=a.jpg") == {"image": ["a.jpg"]}


def test_one_line_errors_name_the_setting():
    assert error_of("--max_iters") == "error: --max_iters: missing value (expected an integer)"
    assert "--lr: missing value" in error_of("--lr", "--max_iters", "3")
    assert error_of("--max_iter", "3").startswith("error: unknown setting --max_iter (did you mean --max_iters?)")
    assert "--max_iters big: expected an integer" in error_of("--max_iters", "big")
    assert "--num_beams 2.5: expected an integer" in error_of("--num_beams", "2.5")


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.overrides(["--help"], DEFAULTS, "Doc line.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Doc line.") and "--max_iters 20000" in out and "--image []" in out


def test_settings_whose_default_is_none_take_their_annotations_type():
    namespace = {"__annotations__": {"inject_start": int | None, "top_p": float | None}}
    kinds = configurator.annotated_types(namespace)
    assert kinds == {"inject_start": int, "top_p": float}
    defaults = {"inject_start": None, "top_p": None}
    assert configurator.overrides(["--inject_start", "3", "--top_p=1"], defaults, kinds=kinds) == {
        "inject_start": 3, "top_p": 1.0}
    assert configurator.overrides(["--inject_start", "None"], defaults, kinds=kinds) == {"inject_start": None}
    for argv, words in [(["--inject_start", "abc"], "error: --inject_start abc: expected an integer"),
                        (["--inject_start", "2.5"], "error: --inject_start 2.5: expected an integer"),
                        (["--top_p", "x"], "error: --top_p x: expected a number"),
                        (["--top_p"], "error: --top_p: missing value (expected a number)")]:
        with pytest.raises(SystemExit) as e:
            configurator.overrides(argv, defaults, kinds=kinds)
        assert e.value.code == words
    assert error_of("--max_iters", "None") == "error: --max_iters None: expected an integer"


def test_run_words_the_errors_deeper_code_raises_as_one_line(monkeypatch):
    def missing():
        raise FileNotFoundError("/data/coco/dataset_coco.json: missing coco annotation file\n(expected ...)")

    def bug():
        raise KeyError("not a user's mistake")

    monkeypatch.delenv("EPALM_DEBUG", raising=False)
    assert configurator.run(lambda: 7) == 7
    with pytest.raises(SystemExit) as e:
        configurator.run(missing)
    assert e.value.code == "error: /data/coco/dataset_coco.json: missing coco annotation file (expected ...)"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        configurator.run(bug)
    with pytest.raises(FileNotFoundError):
        configurator.run(missing, debug=True)
    monkeypatch.setenv("EPALM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        configurator.run(missing)
