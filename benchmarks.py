"""The paper's benchmarks read from their standard layouts: COCO captions (Karpathy split), VQAv2, GQA, AudioCaps,
MSR-VTT captions, MSRVTT-QA and MSVD-QA, each split as a list of data.Example.

References: the layouts of the official releases named in the table below (coco: Karpathy's dataset_coco.json;
visualqa.org; GQA's balanced questions; cdjkim/audiocaps; MSR-VTT as CLIP4Clip ships it and JSFusion's 1k-A test
set; xudejing/video-question-answering for MSRVTT-QA and MSVD-QA).
"""
import csv
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from data import Example, check_failures, vqa_prompt
from media import (AUDIO_SUFFIXES, PIL_ANIMATION_SUFFIXES, VIDEO_SUFFIXES, MediaError, load_audio, load_image,
                   load_video, one_line)

# name       task     files under the root folder (where they come from)
# coco       caption  dataset_coco.json, Karpathy's split (cs.stanford.edu/people/karpathy/deepimagesent), and the
#                     images it names (filepath/filename) in train2014/ and val2014/ (cocodataset.org)
# vqav2      vqa      v2_OpenEnded_mscoco_{train,val}2014_questions.json and v2_mscoco_{train,val}2014_annotations.json
#                     (visualqa.org), images in {train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg
# gqa        vqa      {split}_balanced_questions.json (id -> {imageId, question, answer}) and images/{imageId}.jpg
#                     (cs.stanford.edu/people/dorarad/gqa)
# audiocaps  caption  {split}.csv (audiocap_id,youtube_id,start_time,caption; github.com/cdjkim/audiocaps) and the
#                     clips, cut from YouTube by the user, in {split}/ named {youtube_id} or {audiocap_id} with any of
#                     AUDIO_SUFFIXES; YouTube loses videos, so rows without a clip are skipped with one warning
# msrvtt     caption  MSRVTT_data.json (as CLIP4Clip ships it) or the official train_val_videodatainfo.json:
#                     "videos" [{video_id, split}], "sentences" [{video_id, caption}]; videos/{video_id}.mp4; split
#                     test is the 1k-A set when MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence) is there
# msrvtt_qa  vqa      {split}_qa.json [{question, answer, video_id: 7}] (github.com/xudejing/video-question-answering)
#                     and videos/video7.mp4
# msvd_qa    vqa      {split}_qa.json [{question, answer, video_id: 1}] (same source) and videos/ with the clip named
#                     by youtube_mapping.txt ("-4wsuPCjDBc_5_15 vid1" per line) if present, else vid1
# jsonl      from the  {split}.jsonl, one JSON object per line: {"media", "caption" or "captions"} or {"media",
#            fields    "question", "answer" and/or "answers"}, optional "id"; media paths relative to the file or
#                      absolute, their modality is train.py's --modality
# Captions: a training split gives one Example per caption, an evaluation split one per media with every caption as
# references. VQA: one Example per question in every split. Media files may have any extension where a folder
# listing finds them (audio, video); images are named by the annotations.


def annotation_file(root: Path, name: str, *candidates: str, required: bool = True) -> Path | None:
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    if required:
        raise FileNotFoundError(f"{root / candidates[0]}: missing {name} annotation file "
                                f"(expected under {root}: {DATASETS[name].layout})")
    return None


def media_dir(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing {name} media folder (expected: {DATASETS[name].layout})")
    return path


def read_annotations(path: Path):
    """An annotation file's JSON (hub.read_json is a checkpoint folder's config)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None


def read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
        f.seek(0)
        # JSFusion's csv circulates with ',' and with ';' between fields
        rows = csv.DictReader(f, delimiter=max(",;\t", key=header.count))
        missing = [c for c in columns if c not in (rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {rows.fieldnames})")
        return list(rows)


def media_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Name without extension -> file, from one directory listing rather than a stat per annotation."""
    return {Path(e.name).stem: Path(e.path) for e in os.scandir(folder) if e.name.lower().endswith(suffixes)}


def caption_examples(groups: list[tuple], split: str) -> list[Example]:
    """groups: (media id, media, captions, meta)."""
    if split == "train":
        return [Example(f"{i}_{k}", m, "", c, caps, meta) for i, m, caps, meta in groups for k, c in enumerate(caps)]
    return [Example(str(i), m, "", caps[0], caps, meta) for i, m, caps, meta in groups]


def qa_example(id, media, question: str, answer: str, references: list, meta: dict) -> Example:
    return Example(str(id), media, vqa_prompt(question), " " + answer.strip(), references,
                   {**meta, "question": question})


def read_coco(root: Path, split: str) -> list[Example]:
    images = read_annotations(annotation_file(root, "coco", "dataset_coco.json"))["images"]
    wanted = ("train", "restval") if split == "train" else (split,)  # restval: the val2014 images Karpathy trains on
    groups = [(im["cocoid"], root / im["filepath"] / im["filename"], [s["raw"].strip() for s in im["sentences"]],
               {"image_id": im["cocoid"]}) for im in images if im["split"] in wanted]
    for folder in {m.parent for _, m, _, _ in groups}:
        media_dir(folder, "coco")
    return caption_examples(groups, split)


def read_vqav2(root: Path, split: str) -> list[Example]:
    coco = f"{split}2014"
    questions_path = annotation_file(root, "vqav2", f"v2_OpenEnded_mscoco_{coco}_questions.json")
    questions = read_annotations(questions_path)["questions"]
    annotation_path = annotation_file(root, "vqav2", f"v2_mscoco_{coco}_annotations.json")
    annotations = {a["question_id"]: a for a in read_annotations(annotation_path)["annotations"]}
    folder, out = media_dir(root / coco, "vqav2"), []
    for q in questions:
        if q["question_id"] not in annotations:
            raise ValueError(f"{annotation_path}: no annotation for question_id {q['question_id']}")
        a = annotations[q["question_id"]]
        humans = [h["answer"] for h in a["answers"]]
        # the official files carry the majority answer; the most frequent of the ten stands in where it is absent
        answer = a.get("multiple_choice_answer") or max(humans, key=humans.count)
        out.append(qa_example(q["question_id"], folder / f"COCO_{coco}_{q['image_id']:012d}.jpg", q["question"],
                              answer, humans, {"image_id": q["image_id"]}))
    return out


def read_gqa(root: Path, split: str) -> list[Example]:
    questions = read_annotations(annotation_file(root, "gqa", f"{split}_balanced_questions.json"))
    folder = media_dir(root / "images", "gqa")
    return [qa_example(i, folder / f"{q['imageId']}.jpg", q["question"], q["answer"], [q["answer"]],
                       {"image_id": q["imageId"]}) for i, q in questions.items()]


def read_audiocaps(root: Path, split: str) -> list[Example]:
    path = annotation_file(root, "audiocaps", f"{split}.csv")
    rows = read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption"))
    folder = media_dir(root / split, "audiocaps")
    clips = media_files(folder, AUDIO_SUFFIXES)
    by_video = {}  # an evaluation clip has 5 rows (5 captions), a training clip usually 1
    for r in rows:
        by_video.setdefault(r["youtube_id"], []).append(r)
    groups, skipped = [], 0
    for video, rs in by_video.items():
        clip = next((clips[n] for n in [video] + [r["audiocap_id"] for r in rs] if n in clips), None)
        if clip is None:
            skipped += len(rs)
            continue
        meta = {"youtube_id": video, "start_time": rs[0]["start_time"], "audiocap_ids": [r["audiocap_id"] for r in rs]}
        groups.append((video, clip, [r["caption"].strip() for r in rs], meta))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} of {len(rows)} rows whose clip is not in {folder}")
    return caption_examples(groups, split)


def video_files(root: Path, name: str, names: list[str]) -> list[Path]:
    folder = media_dir(root / "videos", name)
    files = media_files(folder, VIDEO_SUFFIXES)
    missing = [n for n in names if n not in files]
    if missing:
        raise FileNotFoundError(f"{folder}: no video file for {len(missing)} of {len(names)} clips, e.g. {missing[0]}")
    return [files[n] for n in names]


def read_msrvtt(root: Path, split: str) -> list[Example]:
    jsfusion = root / "MSRVTT_JSFUSION_test.csv"
    one_k_a = split == "test" and jsfusion.is_file()
    path = annotation_file(root, "msrvtt", "MSRVTT_data.json", "train_val_videodatainfo.json", required=not one_k_a)
    info = read_annotations(path) if path else {"videos": [], "sentences": []}
    captions = {}
    for s in info["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"].strip())
    if one_k_a:  # 1000 test videos (JSFusion); scored against all their captions when the json is there
        rows = read_csv(jsfusion, ("video_id", "sentence"))
        videos = [r["video_id"] for r in rows]
        for r in rows:
            captions.setdefault(r["video_id"], [r["sentence"].strip()])
    else:
        videos = [v["video_id"] for v in info["videos"] if v["split"] == {"val": "validate"}.get(split, split)]
    files = video_files(root, "msrvtt", videos)
    return caption_examples([(v, f, captions[v], {"video_id": v}) for v, f in zip(videos, files)], split)


def read_video_qa(root: Path, name: str, split: str) -> list[Example]:
    items = read_annotations(annotation_file(root, name, f"{split}_qa.json"))
    names = {}  # msvd: vid<N> -> YouTube clip name
    mapping = root / "youtube_mapping.txt"
    if name == "msvd_qa" and mapping.is_file():
        for n, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{mapping}: line {n} is not '<clip name> vid<N>': {line[:80]!r}")
            names[fields[1]] = fields[0]
    prefix = "video" if name == "msrvtt_qa" else "vid"
    videos = [names.get(v, v) for v in (f"{prefix}{q['video_id']}" if isinstance(q["video_id"], int)
                                        else str(q["video_id"]) for q in items)]
    files = video_files(root, name, videos)
    return [qa_example(q.get("id", k), f, q["question"], str(q["answer"]), [str(q["answer"])], {"video_id": v})
            for k, (q, v, f) in enumerate(zip(items, videos, files))]


def read_msrvtt_qa(root: Path, split: str) -> list[Example]:
    return read_video_qa(root, "msrvtt_qa", split)


def read_msvd_qa(root: Path, split: str) -> list[Example]:
    return read_video_qa(root, "msvd_qa", split)


# ---- your own data: JSON Lines ----

def jsonl_records(path: Path):
    """(line number, JSON object) of each non-blank line. Lines are split at b"\n" only: a JSON string may hold
    U+2028 and other characters that str.splitlines would split at."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM some editors write
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n}: not UTF-8 text ({one_line(e)})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not JSON ({one_line(e)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object {{...}}, got {type(record).__name__}")
            yield n, record


def text_field(path: Path, n: int, record: dict, key: str, many: bool = False):
    """record[key]: a non-empty string, or with many a non-empty list of them; None when absent."""
    if key not in record:
        return None
    value = record[key]
    texts = value if many and isinstance(value, list) else [value]
    if (many and not isinstance(value, list)) or not value or not all(isinstance(t, str) and t.strip() for t in texts):
        kind = "a non-empty list of non-empty strings" if many else "a non-empty string"
        raise ValueError(f"{path}: line {n}: field {key!r} must be {kind}, got {json.dumps(value)[:80]}")
    return value


def record_task(path: Path, n: int, record: dict) -> str:
    has_caption, has_question = bool({"caption", "captions"} & set(record)), "question" in record
    if has_caption == has_question:
        fields = ", ".join(map(repr, record)) or "none"
        raise ValueError(f"{path}: line {n}: expected \"caption\"/\"captions\" (captioning) or \"question\" with "
                         f"\"answer\"/\"answers\" (VQA), not both or neither (fields: {fields})")
    return "caption" if has_caption else "vqa"


def record_texts(path: Path, n: int, record: dict, task: str) -> tuple[str | None, str, list[str]]:
    """(question or None, target, references): a caption line's target is its first caption; a question's is
    its "answer", else the most frequent of its "answers" (as VQAv2's majority answer)."""
    if task == "caption":
        one, many = text_field(path, n, record, "caption"), text_field(path, n, record, "captions", many=True)
        if one is not None and many is not None:
            raise ValueError(f"{path}: line {n}: give 'caption' or 'captions', not both")
        captions = [c.strip() for c in many or [one]]
        return None, captions[0], captions
    question = text_field(path, n, record, "question")
    answer, answers = text_field(path, n, record, "answer"), text_field(path, n, record, "answers", many=True)
    if answer is None and answers is None:
        raise ValueError(f"{path}: line {n}: a question needs 'answer' or 'answers'")
    return question, answer if answer is not None else max(answers, key=answers.count), answers or [answer]


def jsonl_task(root) -> str:
    """The task of a jsonl data set: the fields of the first line of its train.jsonl."""
    path = annotation_file(Path(root), "jsonl", "train.jsonl")
    for n, record in jsonl_records(path):
        return record_task(path, n, record)
    raise ValueError(f"{path}: no examples (the file is empty or blank)")


MEDIA_SUFFIXES = {"audio": AUDIO_SUFFIXES + VIDEO_SUFFIXES, "video": VIDEO_SUFFIXES + PIL_ANIMATION_SUFFIXES}
LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


def check_media(path: Path, n: int, file: Path, modality: str) -> None:
    """A media file that exists must be a readable file (or, for video, a folder of frames) of the modality. A
    suffix the modality's reader does not list is decoded once, so the error is the one sample.py gives."""
    if modality == "video" and file.is_dir():
        return
    if not file.is_file() or not os.access(file, os.R_OK):
        what = "a folder (a folder of frames is read as a video only)" if file.is_dir() else "not a readable file"
        raise ValueError(f"{path}: line {n}: media {file} is {what}")
    suffixes = MEDIA_SUFFIXES.get(modality) or tuple(Image.registered_extensions())
    if file.suffix.lower() in suffixes:
        return
    try:
        LOADERS[modality](file)
    except MediaError as e:
        raise ValueError(f"{path}: line {n}: {e}") from None


def read_jsonl(root: Path, split: str, modality: str) -> list[Example]:
    """{split}.jsonl (the README's "Your own data"). The task follows from the fields, one task in every line
    and in train.jsonl; lines whose media file does not exist are skipped, counted once (the 1% rule)."""
    path = annotation_file(root, "jsonl", f"{split}.jsonl")
    train_task = jsonl_task(root) if split != "train" and (root / "train.jsonl").is_file() else None
    first, lines, ids, missing, groups, questions = None, 0, {}, [], [], []
    for n, record in jsonl_records(path):
        lines += 1
        task = record_task(path, n, record)
        first = first or (n, task)
        other = (f"line {first[0]}" if task != first[1] else
                 root / "train.jsonl" if train_task and task != train_task else None)
        if other:
            raise ValueError(f"{path}: line {n}: a {'caption' if task == 'caption' else 'question'}, but {other} "
                             f"has {'questions' if task == 'caption' else 'captions'}: a data set holds one task")
        id = record.get("id", n)
        if not isinstance(id, (str, int)) or isinstance(id, bool):
            raise ValueError(f"{path}: line {n}: field 'id' must be a string or an integer, got {json.dumps(id)[:80]}")
        if str(id) in ids:
            raise ValueError(f"{path}: line {n}: id {str(id)!r} is already the id of line {ids[str(id)]}")
        ids[str(id)] = n
        name = text_field(path, n, record, "media")
        if name is None:
            raise ValueError(f"{path}: line {n}: no field 'media' (the path of the media file)")
        question, target, references = record_texts(path, n, record, task)
        file = path.parent / name  # an absolute name stays itself
        if not file.exists():
            missing.append((n, name))
            continue
        check_media(path, n, file, modality)
        if task == "caption":
            groups.append((id, file, references, {"line": n}))
        else:
            questions.append(qa_example(id, file, question, target, references, {"line": n}))
    if not lines:
        raise ValueError(f"{path}: no examples (the file is empty or blank)")
    if missing:
        warnings.warn(f"{path}: skipped {len(missing)} of {lines} lines whose media file does not exist, the "
                      f"first on line {missing[0][0]}: {missing[0][1]}")
        check_failures(len(missing), lines, f"media files named in {path}")
    return caption_examples(groups, split) if first[1] == "caption" else questions


@dataclass(frozen=True)
class Benchmark:
    task: str | None            # "caption" or "vqa"; None: the fields of the files say (jsonl_task)
    modality: str | None        # "image", "audio" or "video"; None: train.py's --modality says
    splits: tuple[str, ...]
    layout: str                 # what the root folder holds, said in the errors when something is missing
    read: Callable[[Path, str], list[Example]]


DATASETS = {
    "coco": Benchmark("caption", "image", ("train", "val", "test"), "dataset_coco.json + train2014/, val2014/",
                      read_coco),
    "vqav2": Benchmark("vqa", "image", ("train", "val"), "v2_OpenEnded_mscoco_{split}2014_questions.json + "
                       "v2_mscoco_{split}2014_annotations.json + {split}2014/", read_vqav2),
    "gqa": Benchmark("vqa", "image", ("train", "val", "testdev"), "{split}_balanced_questions.json + images/",
                     read_gqa),
    "audiocaps": Benchmark("caption", "audio", ("train", "val", "test"), "{split}.csv + {split}/ with the clips",
                           read_audiocaps),
    "msrvtt": Benchmark("caption", "video", ("train", "val", "test"), "MSRVTT_data.json or "
                        "train_val_videodatainfo.json (+ MSRVTT_JSFUSION_test.csv) + videos/", read_msrvtt),
    "msrvtt_qa": Benchmark("vqa", "video", ("train", "val", "test"), "{split}_qa.json + videos/", read_msrvtt_qa),
    "msvd_qa": Benchmark("vqa", "video", ("train", "val", "test"),
                         "{split}_qa.json + videos/ (+ youtube_mapping.txt)", read_msvd_qa),
    "jsonl": Benchmark(None, None, ("train", "val", "test"), "train.jsonl + val.jsonl and/or test.jsonl, one "
                       '{"media", "caption(s)" | "question", "answer(s)"} object per line', read_jsonl),
}


def dataset_task(name: str, root) -> str:
    """caption or vqa: fixed per benchmark; for jsonl, what the first line of root/train.jsonl holds."""
    return DATASETS[name].task or jsonl_task(root)


def read_dataset(name: str, root, split: str, modality: str | None = None) -> list[Example]:
    """The examples of one split of one of the paper's data sets, read from its standard layout under root (the
    table at the top), or of the user's own (jsonl, whose media files are checked against modality)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    benchmark = DATASETS[name]
    if split not in benchmark.splits:
        raise ValueError(f"{name}: unknown split {split!r}: expected one of {', '.join(benchmark.splits)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {name} root folder does not exist (expected in it: {benchmark.layout})")
    try:
        # jsonl is the one layout that does not imply its modality
        examples = benchmark.read(root, split, modality) if name == "jsonl" else benchmark.read(root, split)
    except (KeyError, TypeError) as e:  # a record without a field, or a field of the wrong kind
        raise ValueError(f"{root}: malformed {name} annotations ({type(e).__name__}: {one_line(e)})") from None
    if not examples:
        raise ValueError(f"{root}: no {name} examples in split {split!r}")
    return examples
