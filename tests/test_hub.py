"""hub.py: downloads through huggingface_hub from a loopback fake hub, strict loading, the adaptation checkpoint.

The fake hub answers HEAD and GET on /{org}/{name}/resolve/main/{file} as huggingface.co does: X-Repo-Commit on
every answer, small files with a git-sha1 ETag, weight files as a 302 to a "CDN" on another port (so another
origin, where huggingface_hub stops its HEAD) carrying X-Linked-Size and X-Linked-Etag, 404 + X-Error-Code:
EntryNotFound for a missing file, 401 + RepoNotFound for a missing repo, Range answered with 206. Every resolve()
against it runs in a fresh python with the environment set as a user sets it, since huggingface_hub reads
HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported. Reference values: the bytes and
tensors of a tiny transformers OPT written with save_pretrained.
"""
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hub
import toy
from conftest import ROOT

REPO = "tiny-org/tiny-opt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
EXTRAS = ("vocab.json", "tokenizer.json")  # the repo has vocab.json, not tokenizer.json


class FakeHub:
    """The hub and its CDN, two http.servers on 127.0.0.1 serving repos from root/{org}/{name}/; every request is
    recorded as (server, method, path, Range)."""

    def __init__(self, root: Path):
        self.root, self.requests, self.drop_after, self.not_a_hub = root, [], None, False
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def reply(self, status, headers, data=b"", body=True):
                self.send_response(status)
                for k, v in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def answer(self, body):
                cdn = self.server is fake.cdn
                fake.requests.append(("cdn" if cdn else "hub", self.command, self.path, self.headers.get("Range")))
                parts = urllib.parse.unquote(self.path).lstrip("/").split("/")
                if fake.not_a_hub:  # a proxy's or a captive portal's page, say
                    return self.reply(200, {"Content-Type": "text/html"}, b"<html>hello</html>", body)
                if not cdn:
                    if len(parts) < 5 or parts[2:4] != ["resolve", "main"]:
                        return self.reply(404, {}, body=body)
                    if not (fake.root / parts[0] / parts[1]).is_dir():  # the hub answers 401 for private repos too
                        return self.reply(401, {"X-Error-Code": "RepoNotFound",
                                                "X-Error-Message": "Repository not found"}, body=body)
                    parts = parts[:2] + parts[4:]
                file = fake.root.joinpath(*parts)
                if not file.is_file():
                    return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                            "X-Repo-Commit": COMMIT}, body=body)
                data = file.read_bytes()
                if not cdn and file.suffix in (".safetensors", ".bin"):  # LFS: a redirect to the CDN
                    sha = hashlib.sha256(data).hexdigest()
                    return self.reply(302, {"Location": f"{fake.cdn_url}/{'/'.join(parts)}", "X-Repo-Commit": COMMIT,
                                            "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{sha}"',
                                            "ETag": f'"{sha}"'}, body=body)
                headers = {} if cdn else {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"'}
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if body and cdn and fake.drop_after is not None:  # the connection dies mid-file
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:fake.drop_after])
                    fake.drop_after = None
                    self.close_connection = True
                    return
                self.reply(206 if start else 200, headers, data[start:], body)

        self.hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in (self.hub, self.cdn))
        for server in (self.hub, self.cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self):
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def asked(self, method=None):
        """Paths requested for files; huggingface_hub's own /api/ calls are left out (2.x asks for
        /api/agent-harnesses at most once a day, for its User-Agent header)."""
        return [path for _, m, path, _ in self.requests if method in (None, m) and not path.startswith("/api/")]


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


RESOLVE = """
import json, sys
import hub
try:
    print(json.dumps({"folder": str(hub.resolve(sys.argv[1], tuple(sys.argv[2:])))}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def resolve_as_a_user(repo, extra_files=(), **env) -> dict:
    """{"folder": ...} or {"error": type, "message": ...} of hub.resolve in a fresh python with exactly env's
    Hugging Face variables set (none of the caller's, so never the user's own cache or token)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE" and "proxy" not in k.lower()}
    run = subprocess.run([sys.executable, "-c", RESOLVE, repo, *extra_files], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**clean, "OMP_NUM_THREADS": "1", **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny OPT saved by transformers: tiny-opt with model.safetensors and also a pytorch_model.bin (which must
    never be fetched), tiny-sharded with an index and several shards; and no-config, an empty repo."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("repos")
    model.save_pretrained(root / REPO)
    model.save_pretrained(root / "tiny-org" / "tiny-sharded", max_shard_size="20KB")
    torch.save(model.state_dict(), root / REPO / "pytorch_model.bin")
    (root / REPO / "vocab.json").write_text('{"a": 0}')
    (root / "tiny-org" / "no-config").mkdir()
    return model, root


@pytest.fixture
def fake_hub(reference):
    fake = FakeHub(reference[1])
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def filled_cache(reference, tmp_path_factory):
    """An HF_HOME after one online resolve(REPO, EXTRAS)."""
    home = tmp_path_factory.mktemp("filled") / "hf"
    fake = FakeHub(reference[1])
    try:
        assert "folder" in resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=fake.url, HF_HOME=str(home))
    finally:
        fake.close()
    return home


def copy_of(home: Path, tmp_path: Path) -> Path:
    shutil.copytree(home, tmp_path / "hf", symlinks=True)  # the snapshot's links to blobs/ are relative
    return tmp_path / "hf"


def assert_matches_reference(state, model):
    ref = model.state_dict()
    assert len(state) >= len(ref) - 1  # lm_head.weight is tied to embed_tokens and not stored
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.slow
def test_fresh_download_lands_in_the_hf_cache(fake_hub, reference, tmp_path):
    model, root = reference
    got = resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    folder = Path(got["folder"])
    assert folder == tmp_path / "hf" / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / COMMIT
    for name in ("config.json", "model.safetensors", "vocab.json"):
        assert (folder / name).is_symlink() and (folder / name).read_bytes() == (root / REPO / name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert f"/{REPO}/resolve/main/model.safetensors.index.json" in fake_hub.asked()  # the preferred layout first
    assert f"/{REPO}/resolve/main/tokenizer.json" in fake_hub.asked()  # absent: asked, no error
    assert not [p for p in fake_hub.asked() if "pytorch_model.bin" in p]  # one layout only
    assert [(s, p) for s, m, p, _ in fake_hub.requests if m == "GET" and "safetensors" in p] == [
        ("cdn", f"/{REPO}/model.safetensors")]  # weights fetched once, from where the hub redirected
    assert_matches_reference(hub.load_state_dict(folder), model)
    assert hub.read_json(folder)["hidden_size"] == 32


def test_sharded_download_and_load(fake_hub, reference, tmp_path):
    model, root = reference
    got = resolve_as_a_user("tiny-org/tiny-sharded", HF_ENDPOINT=fake_hub.url, HF_HUB_CACHE=str(tmp_path / "hub"))
    folder = Path(got["folder"])
    assert folder == tmp_path / "hub" / "models--tiny-org--tiny-sharded" / "snapshots" / COMMIT
    shards = sorted(p.name for p in (root / "tiny-org" / "tiny-sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
    assert not [p for p in fake_hub.asked() if p.endswith("/model.safetensors")]  # the index came first
    assert_matches_reference(hub.load_state_dict(folder), model)


@pytest.mark.slow
def test_second_resolve_asks_only_what_may_have_changed(fake_hub, filled_cache, tmp_path):
    home = copy_of(filled_cache, tmp_path)
    got = resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=fake_hub.url, HF_HOME=str(home))
    assert got["folder"] == str(home / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / COMMIT)
    assert fake_hub.asked("GET") == []
    assert sorted(fake_hub.asked("HEAD")) == [f"/{REPO}/resolve/main/{f}"
                                              for f in ("config.json", "model.safetensors", "vocab.json")]


@pytest.mark.slow
def test_offline_with_a_filled_cache_makes_no_request(fake_hub, filled_cache, reference, tmp_path):
    home = copy_of(filled_cache, tmp_path)
    got = resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=fake_hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    assert got["folder"] == str(home / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / COMMIT)
    assert fake_hub.requests == []
    assert_matches_reference(hub.load_state_dict(got["folder"]), reference[0])


@pytest.mark.slow
def test_offline_uses_the_first_layout_the_cache_has(fake_hub, reference, tmp_path):
    """A cache filled by someone else, with pytorch_model.bin only and no record of what the hub lacks."""
    repo_dir = tmp_path / "hub" / "models--tiny-org--tiny-opt"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    (repo_dir / "snapshots" / COMMIT).mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(reference[1] / REPO / name, repo_dir / "blobs" / name)
        (repo_dir / "snapshots" / COMMIT / name).symlink_to(Path("..", "..", "blobs", name))
    got = resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=fake_hub.url, HF_HUB_CACHE=str(tmp_path / "hub"),
                            HF_HUB_OFFLINE="1")
    assert got["folder"] == str(repo_dir / "snapshots" / COMMIT) and fake_hub.requests == []
    assert_matches_reference(hub.load_state_dict(got["folder"]), reference[0])


def test_unreachable_hub_with_a_filled_cache(filled_cache, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = copy_of(filled_cache, tmp_path)
    got = resolve_as_a_user(REPO, EXTRAS, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(home))
    assert got["folder"] == str(home / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / COMMIT)


def test_offline_with_an_empty_cache_says_what_to_do(fake_hub, tmp_path):
    got = resolve_as_a_user(REPO, HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert got == {"error": "ConnectionError", "message": f"cannot download {REPO}/config.json: offline "
                   "(HF_HUB_OFFLINE is set) and not in the Hugging Face cache; pass a local folder or download it "
                   "once with network"}
    assert fake_hub.requests == []


@pytest.mark.slow
def test_an_endpoint_that_is_not_a_hub(fake_hub, tmp_path):
    fake_hub.not_a_hub = True
    got = resolve_as_a_user(REPO, HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    assert got["error"] == "ConnectionError" and "\n" not in got["message"]
    assert got["message"].startswith(f"cannot download {REPO}/config.json: hub unreachable (FileMetadataError: ")
    assert got["message"].endswith("and not in the Hugging Face cache; pass a local folder or download it once "
                                   "with network")


@pytest.mark.slow
def test_missing_repository_mentions_hf_token(fake_hub, tmp_path):
    got = resolve_as_a_user("tiny-org/nothing", HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    assert got == {"error": "FileNotFoundError", "message": "tiny-org/nothing: no such folder, nor a repository on "
                   "the hub that this machine can read (private or gated? set HF_TOKEN)"}


def test_a_repo_without_config(fake_hub, tmp_path):
    got = resolve_as_a_user("tiny-org/no-config", HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    assert got == {"error": "FileNotFoundError", "message": "tiny-org/no-config/config.json: not on the hub"}


@pytest.mark.slow
def test_dropped_connection_leaves_no_corrupt_file(fake_hub, reference, tmp_path):
    fake_hub.drop_after = 1000
    env = dict(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    got = resolve_as_a_user(REPO, **env)  # huggingface_hub 2.x tries again at once
    if "error" in got:  # 0.25 gives up, and resumes on the next call with a Range request
        got = resolve_as_a_user(REPO, **env)
    data = (reference[1] / REPO / "model.safetensors").read_bytes()
    assert (Path(got["folder"]) / "model.safetensors").read_bytes() == data
    assert fake_hub.asked("GET").count(f"/{REPO}/model.safetensors") == 2
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_local_folder_and_bad_name(reference):
    folder = reference[1] / REPO
    assert hub.resolve(str(folder)) == folder
    with pytest.raises(FileNotFoundError, match=r"^\./no/such/folder: no such folder, and not a hub id like "
                                                r"'facebook/opt-125m'$"):
        hub.resolve("./no/such/folder")

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
    state = hub.load_state_dict(tmp_path)
    assert state.keys() == ref.keys() and state["steps"].dtype == torch.long
    assert torch.equal(state["proj.weight"], ref["proj.weight"])
    with torch.device("meta"):
        model = Tiny()
    hub.load_weights(model, state, dtype=torch.float16)  # cast on the way in, the long buffer left alone
    assert model.proj.weight.dtype == torch.float16 and torch.equal(model.proj.weight, ref["proj.weight"].half())
    assert model.steps.dtype == torch.long
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


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident memory from /proc")
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_state_dict_is_memory_mapped(tmp_path, name):
    """Without a dtype nothing is read into memory until used (what sharding a large LM later relies on)."""
    def resident_mb():
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) >> 10
    big = {"w": torch.randn(4096, 4096)}  # 64 MB
    save_file(big, tmp_path / name) if name.endswith(".safetensors") else torch.save(big, tmp_path / name)
    del big
    before = resident_mb()
    state = hub.load_state_dict(tmp_path)
    assert state["w"].shape == (4096, 4096) and resident_mb() - before < 16
    state["w"].sum()  # touching it reads it
    assert resident_mb() - before > 48

# ----------------------------------------------------------------------------- the adaptation checkpoint


def trained_tiny():
    model = Tiny()
    model.embed.weight.requires_grad_(False)  # frozen, as the LM: not saved
    with torch.no_grad():
        model.proj.weight.fill_(0.5)
    return model


def test_adapter_round_trip(tmp_path):
    model = trained_tiny()
    run = {"epalm": {"num_levels": 2}, "lm": "facebook/opt-125m", "iter": 7}
    hub.save_adapter(model, tmp_path / "ckpt.safetensors", run)
    state, config = hub.load_adapter(tmp_path / "ckpt.safetensors")
    assert config == run and state.keys() == {"proj.weight", "proj.bias"}
    assert torch.equal(state["proj.weight"], model.proj.weight) and state["proj.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_adapter_save_ignores_a_leftover_tmp(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    (tmp_path / "ckpt.safetensors.tmp").write_bytes(b"half a file from a killed save")
    hub.save_adapter(trained_tiny(), path, {"epalm": {}, "iter": 1})
    assert hub.load_adapter(path)[1]["iter"] == 1 and not (tmp_path / "ckpt.safetensors.tmp").exists()
    (tmp_path / "ckpt.safetensors.tmp").write_bytes(b"another killed save")  # beside a good checkpoint
    assert hub.load_adapter(path)[1]["iter"] == 1


def test_adapter_errors_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.txt: not a readable eP-ALM checkpoint \(") as err:
        hub.load_adapter(tmp_path / "notes.txt")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="missing.safetensors: not a readable eP-ALM checkpoint"):
        hub.load_adapter(tmp_path / "missing.safetensors")
    save_file(tiny_state(), tmp_path / "model.safetensors")  # a checkpoint, but not one of ours
    with pytest.raises(ValueError, match="model.safetensors: no eP-ALM run configuration in its metadata"):
        hub.load_adapter(tmp_path / "model.safetensors")


# ----------------------------------------------------------------------------- a shared adapter, the toy backbones

ADAPTER = """
import json, sys
import hub
try:
    print(json.dumps({"path": str(hub.adapter_path(sys.argv[1]))}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def adapter_as_a_user(name, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    run = subprocess.run([sys.executable, "-c", ADAPTER, name], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**clean, "OMP_NUM_THREADS": "1", **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture
def adapter_hub(tmp_path):
    """The fake hub serving me/adapter (ckpt.safetensors and a README.md) and me/no-ckpt (a README.md only)."""
    root = tmp_path / "repos"
    for name in ("adapter", "no-ckpt"):
        (root / "me" / name).mkdir(parents=True)
        (root / "me" / name / "README.md").write_text("---\nlibrary_name: epalm\n---\n")
    hub.save_adapter(trained_tiny(), root / "me" / "adapter" / "ckpt.safetensors", {"epalm": {}, "iter": 3})
    fake = FakeHub(root)
    yield fake, root
    fake.close()


@pytest.mark.slow
def test_adapter_from_the_hub_lands_in_the_cache_then_works_offline(adapter_hub, tmp_path):
    fake, root = adapter_hub
    got = adapter_as_a_user("me/adapter", HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"))
    path = Path(got["path"])
    assert path == tmp_path / "hf" / "hub" / "models--me--adapter" / "snapshots" / COMMIT / "ckpt.safetensors"
    assert path.read_bytes() == (root / "me" / "adapter" / "ckpt.safetensors").read_bytes()
    assert [(s, p) for s, m, p, _ in fake.requests if m == "GET" and not p.startswith("/api/")] == [
        ("cdn", "/me/adapter/ckpt.safetensors")]
    assert not [p for p in fake.asked() if "config.json" in p or "README" in p]  # only the checkpoint
    assert hub.load_adapter(path)[1] == {"epalm": {}, "iter": 3}
    fake.requests.clear()
    again = adapter_as_a_user("me/adapter", HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert again == got and fake.requests == []


@pytest.mark.slow
def test_adapter_errors_from_the_hub_are_one_line(adapter_hub, tmp_path):
    fake, _ = adapter_hub
    env = dict(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"))
    assert adapter_as_a_user("me/no-ckpt", **env) == {"error": "FileNotFoundError",
                                                      "message": "me/no-ckpt/ckpt.safetensors: not on the hub"}
    got = adapter_as_a_user("me/nothing", **env)
    assert got["error"] == "FileNotFoundError" and "private or gated? set HF_TOKEN" in got["message"]
    got = adapter_as_a_user("me/adapter", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty"))
    assert got["error"] == "ConnectionError" and got["message"].startswith(
        "cannot download me/adapter/ckpt.safetensors: offline (HF_HUB_OFFLINE is set)")


def test_adapter_path_of_local_files_and_folders(tmp_path):
    hub.save_adapter(trained_tiny(), tmp_path / "ckpt.safetensors", {"epalm": {}})
    assert hub.adapter_path(str(tmp_path)) == tmp_path / "ckpt.safetensors"
    assert hub.adapter_path(str(tmp_path / "ckpt.safetensors")) == tmp_path / "ckpt.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'empty'}: no ckpt.safetensors in this folder"):
        hub.adapter_path(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'gone'}: no checkpoint \\(no such file or folder"):
        hub.adapter_path(str(tmp_path / "gone"))


def test_toy_backbones_resolve_in_this_clone_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no toy/ here
    assert hub.resolve("toy/lm") == toy.TOY_DIR / "lm" and hub.resolve("toy/vit") == toy.TOY_DIR / "vit"
    assert hub.toy_backbone("/home/me/moved-clone/toy/lm") == toy.TOY_DIR / "lm"  # an older checkpoint's name
    assert hub.resolve("/home/me/moved-clone/toy/ast") == toy.TOY_DIR / "ast"
    (tmp_path / "mine" / "toy" / "lm").mkdir(parents=True)  # a folder that exists is what it names
    assert hub.toy_backbone(str(tmp_path / "mine" / "toy" / "lm")) is None
    assert hub.toy_backbone("/home/me/moved-clone/toy/gpt") is None  # not a toy backbone of this clone
    assert hub.toy_backbone("facebook/opt-125m") is None
    with pytest.raises(FileNotFoundError, match=f"^{toy.TOY_DIR / 'gpt'}: no such folder"):
        hub.resolve("toy/gpt")
