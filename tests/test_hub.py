"""hub.py: download from a loopback fake hub (resume, checksums, HF-cache hits, offline) and strict loading.

The fake hub serves {org}/{name}/resolve/main/{file} like huggingface.co: small files with a git-sha1 ETag,
weight files as a 302 to a "CDN" path carrying X-Linked-Size and X-Linked-Etag (sha256), Range requests
answered with 206. Reference values: the bytes and tensors a tiny transformers OPT wrote with save_pretrained.
"""
import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hub

REPO = "tiny-org/tiny-opt"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_git_sha1_known_value():  # the value `git hash-object` prints, quoted in huggingface_hub's docs
    assert git_sha1(b"Hello, World!") == "b45ef6fec89518d314f546fd6c3025367b721684"


class FakeHub:
    """http.server on 127.0.0.1 serving repos from root/{org}/{name}/; records every request."""

    def __init__(self, root: Path):
        self.root, self.requests, self.bad_sha, self.drop_after = root, [], set(), None
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append((self.path, self.headers.get("Range")))
                cdn = self.path.startswith("/cdn/")
                parts = self.path.removeprefix("/cdn/").lstrip("/").split("/")
                if cdn:
                    file = fake.root.joinpath(*parts)
                else:
                    if len(parts) < 5 or parts[2:4] != ["resolve", "main"]:
                        return self.send_error(404)
                    file = fake.root.joinpath(parts[0], parts[1], *parts[4:])
                if not file.is_file():
                    return self.send_error(404)
                data = file.read_bytes()
                if not cdn and file.suffix in (".safetensors", ".bin"):  # LFS: the hub redirects to its CDN
                    sha = "0" * 64 if file.name in fake.bad_sha else hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{parts[0]}/{parts[1]}/{'/'.join(parts[4:])}")
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if cdn:
                    self.send_header("ETag", '"not-a-hash"')
                else:
                    sha1 = "0" * 40 if file.name in fake.bad_sha else git_sha1(data)
                    self.send_header("ETag", f'"{sha1}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if cdn and fake.drop_after is not None:  # the connection dies mid-file
                    self.wfile.write(data[start:start + fake.drop_after])
                    fake.drop_after = None
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny OPT saved by transformers: one folder with model.safetensors, one sharded with an index."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("repos")
    model.save_pretrained(root / "tiny-org" / "tiny-opt")
    model.save_pretrained(root / "tiny-org" / "tiny-sharded", max_shard_size="20KB")
    (root / "tiny-org" / "tiny-opt" / "vocab.json").write_text('{"a": 0}')
    return model, root


@pytest.fixture
def fake_hub(reference, tmp_path, monkeypatch):
    fake = FakeHub(reference[1])
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("EPALM_CACHE", str(tmp_path / "epalm"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def assert_matches_reference(state, model):
    ref = model.state_dict()
    assert len(state) >= len(ref) - 1  # lm_head.weight is tied to embed_tokens and not stored
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k


def test_fresh_download(fake_hub, reference, tmp_path):
    model, root = reference
    folder = hub.resolve(REPO, extra_files=("vocab.json", "tokenizer.json"))
    assert folder == tmp_path / "epalm" / "hub" / "tiny-org--tiny-opt"
    for name in ("config.json", "model.safetensors", "vocab.json"):
        assert (folder / name).read_bytes() == (root / REPO / name).read_bytes()
    assert not (folder / "tokenizer.json").exists() and not list(folder.glob("*.part"))
    paths = [p for p, _ in fake_hub.requests]
    assert f"/cdn/{REPO}/model.safetensors" in paths  # followed the hub's redirect
    assert f"/{REPO}/resolve/main/model.safetensors.index.json" in paths  # looked for a sharded layout first
    assert_matches_reference(hub.load_state_dict(folder), model)
    assert hub.read_json(folder)["hidden_size"] == 32
    fake_hub.requests.clear()
    assert hub.resolve(REPO, extra_files=("vocab.json", "tokenizer.json")) == folder
    assert fake_hub.requests == []  # everything cached, the absent tokenizer.json remembered


def test_resume_partial_file(fake_hub, reference, tmp_path):
    data = (reference[1] / REPO / "model.safetensors").read_bytes()
    folder = tmp_path / "epalm" / "hub" / "tiny-org--tiny-opt"
    folder.mkdir(parents=True)
    half = len(data) // 2
    (folder / "model.safetensors.part").write_bytes(data[:half])
    assert hub.resolve(REPO) == folder
    assert (f"/cdn/{REPO}/model.safetensors", f"bytes={half}-") in fake_hub.requests
    assert (folder / "model.safetensors").read_bytes() == data
    assert not (folder / "model.safetensors.part").exists()


def test_dropped_connection_keeps_the_part_and_resumes(fake_hub, reference, tmp_path):
    data = (reference[1] / REPO / "model.safetensors").read_bytes()
    folder = tmp_path / "epalm" / "hub" / "tiny-org--tiny-opt"
    fake_hub.drop_after = 1000
    with pytest.raises(ConnectionError, match=f"{REPO}/model.safetensors: got 1000 of {len(data)} bytes; run again"):
        hub.resolve(REPO)
    assert (folder / "model.safetensors.part").stat().st_size == 1000 and not (folder / "model.safetensors").exists()
    assert hub.resolve(REPO) == folder
    assert fake_hub.requests[-1] == (f"/cdn/{REPO}/model.safetensors", "bytes=1000-")
    assert (folder / "model.safetensors").read_bytes() == data


def test_corrupt_partial_file_is_discarded(fake_hub, reference, tmp_path):
    data = (reference[1] / REPO / "model.safetensors").read_bytes()
    folder = tmp_path / "epalm" / "hub" / "tiny-org--tiny-opt"
    folder.mkdir(parents=True)
    (folder / "model.safetensors.part").write_bytes(b"\xff" * 100)  # right length later, wrong bytes
    with pytest.raises(ValueError, match="tiny-org/tiny-opt/model.safetensors: checksum mismatch"):
        hub.resolve(REPO)
    assert not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.part").exists()
    assert hub.resolve(REPO) == folder  # the next call starts over and succeeds
    assert (folder / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])  # sha256 (LFS) and git sha1 (small file)
def test_checksum_mismatch_leaves_no_file(fake_hub, tmp_path, name):
    fake_hub.bad_sha.add(name)
    with pytest.raises(ValueError, match=f"{REPO}/{name}: checksum mismatch"):
        hub.resolve(REPO)
    folder = tmp_path / "epalm" / "hub" / "tiny-org--tiny-opt"
    assert not (folder / name).exists() and not (folder / (name + ".part")).exists()


def make_hf_cache(tmp_path, root, files, no_exist=()):
    repo_dir = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-opt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:  # the real cache links snapshot files to blobs/{etag}; plain links are enough here
        blob = repo_dir / "blobs" / name
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes((root / REPO / name).read_bytes())
        (snapshot / name).symlink_to(blob)
    for name in no_exist:
        (repo_dir / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (repo_dir / ".no_exist" / commit / name).touch()
    return snapshot


def test_hf_cache_hit_makes_no_request(fake_hub, reference, tmp_path):
    snapshot = make_hf_cache(tmp_path, reference[1], ["config.json", "model.safetensors", "vocab.json"],
                             no_exist=["tokenizer.json"])
    assert hub.resolve(REPO, extra_files=("vocab.json", "tokenizer.json")) == snapshot
    assert fake_hub.requests == []
    assert_matches_reference(hub.load_state_dict(snapshot), reference[0])


def test_hf_cache_without_an_extra_file_downloads_only_that(fake_hub, reference, tmp_path):
    snapshot = make_hf_cache(tmp_path, reference[1], ["config.json", "model.safetensors"], no_exist=["merges.txt"])
    folder = hub.resolve(REPO, extra_files=("vocab.json", "merges.txt"))  # merges.txt known absent: not asked
    assert [p for p, _ in fake_hub.requests] == [f"/{REPO}/resolve/main/vocab.json"]
    assert (folder / "model.safetensors").resolve() == (snapshot / "model.safetensors").resolve()
    assert (folder / "vocab.json").read_text() == '{"a": 0}'


def test_offline_gives_a_clear_error(fake_hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match=f"cannot download {REPO}/config.json: no network .*local folder"):
        hub.resolve(REPO)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        hub.resolve(REPO)
    assert fake_hub.requests == []


def test_unknown_repo_and_bad_name(fake_hub):
    with pytest.raises(FileNotFoundError, match="tiny-org/nothing/config.json: not on the hub"):
        hub.resolve("tiny-org/nothing")
    with pytest.raises(FileNotFoundError, match="no such folder, and not a hub id"):
        hub.resolve("./no/such/folder")


def test_sharded_download_and_load(fake_hub, reference, tmp_path):
    model, root = reference
    folder = hub.resolve("tiny-org/tiny-sharded")
    shards = sorted(p.name for p in (root / "tiny-org" / "tiny-sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
    assert_matches_reference(hub.load_state_dict(folder), model)


def test_local_folder_is_returned_as_is(reference):
    folder = reference[1] / REPO
    assert hub.resolve(str(folder)) == folder

# ----------------------------------------------------------------------------- loading


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as OPT's lm_head
        self.register_buffer("steps", torch.zeros(2, dtype=torch.long))


def tiny_state():
    torch.manual_seed(1)
    return {"embed.weight": torch.randn(10, 4), "proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3),
            "steps": torch.tensor([3, 4])}


def test_load_weights_into_meta_model(tmp_path):
    ref = tiny_state()
    save_file(ref, tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = Tiny()
    hub.load_weights(model, hub.load_state_dict(tmp_path), dtype=torch.bfloat16, source=str(tmp_path))
    assert model.proj.weight.device.type == "cpu" and model.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj.weight, ref["proj.weight"].bfloat16())
    assert torch.equal(model.embed.weight, ref["embed.weight"].bfloat16())
    assert model.head.weight is model.embed.weight  # still tied after assign
    assert model.steps.dtype == torch.long and model.steps.tolist() == [3, 4]
    assert model.proj.weight.requires_grad


def test_load_weights_default_dtype_is_the_models(tmp_path):
    ref = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state().items()}
    with torch.device("meta"):
        model = Tiny()
    hub.load_weights(model, dict(ref))
    assert model.proj.bias.dtype == torch.float32 and torch.equal(model.proj.bias, ref["proj.bias"].float())


def test_transformers_opt_loads_on_meta_and_matches(reference):
    from transformers import OPTForCausalLM
    model, root = reference
    with torch.device("meta"):
        fresh = OPTForCausalLM(model.config)
    hub.load_weights(fresh, hub.load_state_dict(root / REPO), source=str(root / REPO))
    ids = torch.tensor([[2, 5, 9, 11]])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model(ids).logits)


def test_strict_errors_listed_in_one_message():
    state = tiny_state()
    del state["proj.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["proj.weight"] = torch.zeros(5, 4)
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(ValueError) as err:
        hub.load_weights(model, state, source="ckpt-folder")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ckpt-folder: does not fit Tiny")
    assert "missing (1): proj.bias" in msg and "unexpected (1): extra.weight" in msg
    assert "proj.weight checkpoint (5, 4) vs model (3, 4)" in msg


def test_truncated_safetensors_names_the_file(tmp_path):
    save_file(tiny_state(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}: corrupt or truncated"):
        hub.load_state_dict(tmp_path)


def test_pytorch_bin_weights_only(tmp_path):
    ref = tiny_state()
    torch.save(ref, tmp_path / "pytorch_model.bin")
    state = hub.load_state_dict(tmp_path, dtype=torch.float16)
    assert state.keys() == ref.keys() and state["steps"].dtype == torch.long
    assert torch.equal(state["proj.weight"], ref["proj.weight"].half())
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'pytorch_model.bin'}: corrupt or truncated"):
        hub.load_state_dict(tmp_path)


CALLS = []


def record_call(what):
    CALLS.append(what)
    return what


class Payload:  # what a malicious pickle looks like: unpickling it runs a function
    def __reduce__(self):
        return record_call, ("unpickled",)


def test_pytorch_bin_with_objects_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{tmp_path / 'pytorch_model.bin'}: refused"):
        hub.load_state_dict(tmp_path)
    assert CALLS == []


def test_sharded_index(tmp_path):
    ref = tiny_state()
    save_file({k: ref[k] for k in ("embed.weight", "steps")}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: ref[k] for k in ("proj.weight", "proj.bias")}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if k in ('embed.weight', 'steps') else 2}-of-00002.safetensors" for k in ref}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    state = hub.load_state_dict(tmp_path)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: shard listed in"):
        hub.load_state_dict(tmp_path)


def test_no_weights_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        hub.load_state_dict(tmp_path)
    assert hub.read_json(tmp_path, "tokenizer_config.json", required=False) is None
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        hub.read_json(tmp_path)
