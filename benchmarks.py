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

from data import Example, vqa_prompt
from media import AUDIO_SUFFIXES, VIDEO_SUFFIXES, one_line

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


@dataclass(frozen=True)
class Benchmark:
    task: str                   # "caption" or "vqa"
    modality: str               # "image", "audio" or "video"
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
}


def read_dataset(name: str, root, split: str) -> list[Example]:
    """The examples of one split of one of the paper's data sets, read from its standard layout under root (the
    table at the top)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    benchmark = DATASETS[name]
    if split not in benchmark.splits:
        raise ValueError(f"{name}: unknown split {split!r}: expected one of {', '.join(benchmark.splits)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {name} root folder does not exist (expected in it: {benchmark.layout})")
    try:
        examples = benchmark.read(root, split)
    except (KeyError, TypeError) as e:  # a record without a field, or a field of the wrong kind
        raise ValueError(f"{root}: malformed {name} annotations ({type(e).__name__}: {one_line(e)})") from None
    if not examples:
        raise ValueError(f"{root}: no {name} examples in split {split!r}")
    return examples
