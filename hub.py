"""Checkpoint lookup, download and strict loading, shared by every backbone.

resolve() turns a local folder or a Hugging Face hub id into a local folder holding config.json and the
weights: the user's own Hugging Face cache first (no request at all), then our cache (EPALM_CACHE, default
~/.cache/epalm, one folder per repo: hub/{org}--{name}/{file}), else a download over HTTPS from the hub's
public resolve URLs, with a progress bar, resume of a partial file, size and checksum checks and an atomic
rename into place. load_state_dict() reads safetensors (single or sharded) or pytorch_model.bin through
torch.load(weights_only=True, mmap=True), never a full unpickle; load_weights() assigns the tensors into a
model built on the meta device, strictly, so that a large LM is never held twice in memory.

References: the hub cache layout (models--{org}--{name}/refs/main, snapshots/{commit}/, .no_exist/) and the
resolve endpoint's headers (X-Linked-Size, X-Linked-Etag = sha256 of LFS files, ETag = git blob sha1 of
small files) as read by huggingface_hub/file_download.py; the safetensors format
(https://huggingface.co/docs/safetensors); torch.load's weights_only unpickler.
"""
import hashlib
import http.client
import json
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

# in order of preference; an index names its shards in "weight_map"
WEIGHT_LAYOUTS = ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")
TIMEOUT_S = 30  # per connection attempt and per read: a dead network gives an error, never a hang
CHUNK_BYTES = 1 << 20
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # redirects are followed by hand: the hub's own 302 carries the size and sha256 of an LFS file, and the
    # token must not travel on to the CDN
    def redirect_request(self, *args):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)

# ----------------------------------------------------------------------------- what a folder holds


def read_json(folder: Path, name: str = "config.json", required: bool = True) -> dict | None:
    path = Path(folder) / name
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _shards(folder: Path, index_name: str) -> list[str]:
    weight_map = read_json(folder, index_name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{Path(folder) / index_name}: no 'weight_map' in the index")
    return sorted(set(weight_map.values()))


def weight_files(folder: Path) -> list[str] | None:
    """Names of the first weights layout that is complete in folder (an index and all its shards), else None."""
    for name in WEIGHT_LAYOUTS:
        if (folder / name).is_file():
            files = [name] + (_shards(folder, name) if name.endswith(".index.json") else [])
            if all((folder / f).is_file() for f in files):
                return files
    return None

# ----------------------------------------------------------------------------- lookup and download


def resolve(name_or_path: str, extra_files: tuple[str, ...] = ()) -> Path:
    """A local folder as is; for a hub id, a folder with config.json, the weights and whichever of extra_files
    the repo has: the Hugging Face cache's snapshot when complete, else our cache, downloading what is missing."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    repo = str(name_or_path)
    if not REPO_ID.fullmatch(repo):
        raise FileNotFoundError(f"{name_or_path}: no such folder, and not a hub id like 'facebook/opt-125m'")
    cache = Path(os.environ.get("EPALM_CACHE") or Path.home() / ".cache" / "epalm").expanduser()
    ours = cache / "hub" / repo.replace("/", "--")
    snapshot = _hf_cache_snapshot(repo)
    if snapshot is not None:
        no_exist = snapshot.parent.parent / ".no_exist" / snapshot.name
        if all((snapshot / f).is_file() or (no_exist / f).exists() for f in extra_files):
            return snapshot
        # the user has the weights but not every extra file: link what is there, download only the rest
        for f in ["config.json", *weight_files(snapshot), *extra_files]:
            if (snapshot / f).is_file() and not (ours / f).exists():
                (ours / f).parent.mkdir(parents=True, exist_ok=True)
                os.symlink((snapshot / f).resolve(), ours / f)
    absent = ours / ".absent"  # extra files the hub answered 404 for, so a later call asks no more
    for f in extra_files if snapshot is not None else ():
        if (no_exist / f).exists():
            (absent / f).parent.mkdir(parents=True, exist_ok=True)
            (absent / f).touch()
    if (ours / "config.json").is_file() and weight_files(ours) and all(
            (ours / f).is_file() or (absent / f).exists() for f in extra_files):
        return ours
    ours.mkdir(parents=True, exist_ok=True)
    if not _fetch(repo, "config.json", ours):
        raise FileNotFoundError(f"{repo}/config.json: not on the hub (HTTP 404)")
    if weight_files(ours) is None:
        for name in WEIGHT_LAYOUTS:
            if _fetch(repo, name, ours):
                for shard in _shards(ours, name) if name.endswith(".index.json") else []:
                    if not _fetch(repo, shard, ours):
                        raise FileNotFoundError(f"{repo}/{shard}: listed in {name} but not on the hub (HTTP 404)")
                break
        else:
            raise FileNotFoundError(f"{repo}: no weights on the hub (looked for {', '.join(WEIGHT_LAYOUTS)})")
    for f in extra_files:
        if not (absent / f).exists() and not _fetch(repo, f, ours):
            (absent / f).parent.mkdir(parents=True, exist_ok=True)
            (absent / f).touch()
    return ours


def _hf_cache_snapshot(repo: str) -> Path | None:
    """The snapshot folder of repo's main branch in the user's Hugging Face cache, if it has config and weights."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "hub"
    else:
        root = Path.home() / ".cache" / "huggingface" / "hub"
    repo_dir = root.expanduser() / ("models--" + repo.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    if (snapshot / "config.json").is_file() and weight_files(snapshot):
        return snapshot
    return None


def _fetch(repo: str, name: str, folder: Path) -> bool:
    """Download repo's file name into folder unless it is there; False when the hub has no such file."""
    dest = folder / name
    if dest.is_file():
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = f"{endpoint.rstrip('/')}/{repo}/resolve/main/{urllib.parse.quote(name)}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _download(url, dest, f"{repo}/{name}")


def _download(url: str, dest: Path, label: str) -> bool:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        opened = _open(url, label, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already as long as (or longer than) the file
            part.unlink()
            return _download(url, dest, label)
        raise
    if opened is None:
        return False
    resp, size, etag = opened
    with resp:
        if have and resp.status != 206:  # the server ignored the Range header: start over
            have = 0
        if resp.headers.get("Content-Encoding", "identity") != "identity":
            raise RuntimeError(f"cannot download {label}: unexpected Content-Encoding "
                               f"{resp.headers['Content-Encoding']}")
        with open(part, "ab" if have else "wb") as f, tqdm(total=size, initial=have, unit="B", unit_scale=True,
                                                           unit_divisor=1024, desc=label) as bar:
            try:
                while chunk := resp.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise ConnectionError(f"cannot download {label}: interrupted ({e}); "
                                      f"run again to resume from {part}") from e
    got = part.stat().st_size
    if size is not None and got != size:
        if got > size:
            part.unlink()
        raise ConnectionError(f"cannot download {label}: got {got} of {size} bytes; run again to resume")
    if etag and not _digest_matches(part, etag):
        part.unlink()
        raise ValueError(f"cannot download {label}: checksum mismatch (hub says {etag}); download discarded")
    os.replace(part, dest)
    return True


def _open(url: str, label: str, start: int):
    """(response, size or None, hub etag or None) of a GET from start, following redirects; None on 404."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError(f"cannot download {label}: HF_HUB_OFFLINE is set; pass a local folder instead")
    hub_host = urllib.parse.urlparse(url).netloc
    headers = {"User-Agent": "epalm", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    linked_size = linked_etag = hub_etag = None
    for _ in range(10):
        from_hub = urllib.parse.urlparse(url).netloc == hub_host
        req = urllib.request.Request(url, headers=headers)
        if from_hub and os.environ.get("HF_TOKEN"):
            req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
        try:
            resp = _OPENER.open(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                linked_size = linked_size or e.headers.get("X-Linked-Size")
                linked_etag = linked_etag or e.headers.get("X-Linked-Etag")
                hub_etag = hub_etag or (e.headers.get("ETag") if from_hub else None)
                url = urllib.parse.urljoin(url, e.headers["Location"])
                continue
            if e.code == 404:
                return None
            if e.code == 416:
                raise
            why = e.reason
            if e.code in (401, 403):
                why = "no such repository (nor local folder), or it is private or gated (set HF_TOKEN)"
            raise RuntimeError(f"cannot download {label}: HTTP {e.code} {why}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"cannot download {label}: no network ({getattr(e, 'reason', e)}); "
                                  "pass a local folder or fill the Hugging Face cache") from e
        size = linked_size or resp.headers.get("Content-Length")
        if resp.status == 206:  # Content-Range: bytes start-end/total
            size = linked_size or resp.headers.get("Content-Range", "").rpartition("/")[2]
        etag = (linked_etag or hub_etag or (resp.headers.get("ETag") if from_hub else None) or "")
        etag = etag.removeprefix("W/").strip('"')
        return resp, int(size) if size and size.isdigit() else None, etag or None
    raise RuntimeError(f"cannot download {label}: too many redirects")


def _digest_matches(path: Path, etag: str) -> bool:
    """sha256 for LFS files (64 hex digits), git blob sha1 for small files (40); any other etag is not a hash."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        return True
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest() == etag

# ----------------------------------------------------------------------------- reading and loading weights


def load_state_dict(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in folder, keys as stored; floating tensors cast to dtype while reading."""
    folder = Path(folder)
    name = next((n for n in WEIGHT_LAYOUTS if (folder / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{folder}: no weights (looked for {', '.join(WEIGHT_LAYOUTS)})")
    if not name.endswith(".index.json"):
        return _read_weights(folder / name, dtype)
    weight_map = read_json(folder, name)["weight_map"]
    state = {}
    for shard in _shards(folder, name):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard}: shard listed in {name} is missing")
        state.update(_read_weights(folder / shard, dtype))
    lost = [k for k in weight_map if k not in state]
    if lost:
        raise ValueError(f"{folder / name}: {len(lost)} keys of the index are in none of its shards: {lost[:10]}")
    return state


def _read_weights(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    def cast(t):  # one tensor at a time, so the stored dtype is never held for the whole model
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    try:
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                return {k: cast(f.get_tensor(k)) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused, it holds objects other than tensors (read with weights_only=True): "
                         f"{str(e).splitlines()[0]}") from e
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__} with other values")
    return {k: cast(v) for k, v in state.items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 source: str = "") -> torch.nn.Module:
    """Assign state's tensors into model (built on the meta device or not), strictly; state's values are cast in
    place so no second copy stays alive. A parameter tied under several names needs only one of them."""
    expected = model.state_dict()  # on the meta device: names, shapes and dtypes without memory
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    take = {k: k for k in expected if k in state}  # model key -> checkpoint key
    for names in tied.values():
        present = [n for n in names if n in state]
        for n in names:
            if present:
                take.setdefault(n, present[0])
    missing = [k for k in expected if k not in take]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} checkpoint {tuple(state[c].shape)} vs model {tuple(expected[k].shape)}"
             for k, c in take.items() if state[c].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise ValueError(f"{source or 'checkpoint'}: does not fit {type(model).__name__}: {'; '.join(problems)}")
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        return _load_sharded(model, {k: state[c] for k, c in take.items()})
    loaded, done = {}, set()
    for k, c in take.items():
        if c not in done:
            want = dtype if dtype is not None and expected[k].is_floating_point() else expected[k].dtype
            state[c] = state[c].to(want)
            done.add(c)
        loaded[k] = state[c]
    model.load_state_dict(loaded, strict=True, assign=True)
    for names in tied.values():  # assign gave each name its own Parameter: tie them again
        shared = model.get_parameter(names[0])
        for n in names[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    return model


def _load_sharded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy state into a model whose blocks FSDP2 sharded on the meta device: a sharded parameter takes only this
    process's rows of the (memory-mapped) checkpoint tensor, cut as FSDP2 cuts them (torch.chunk along dim 0),
    so only those rows are ever read, cast and moved to the device."""
    mesh = next(p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh"))
    model.to_empty(device=torch.device(mesh.device_type, torch.accelerator.current_device_index())
                   if mesh.device_type != "cpu" else "cpu")
    targets = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, tensor in state.items():
            target = targets[name]
            if hasattr(target, "device_mesh"):
                rows = tensor.chunk(mesh.size(), dim=0)
                tensor, target = (rows[mesh.get_local_rank()] if mesh.get_local_rank() < len(rows) else tensor[:0],
                                  target.to_local())
            target.copy_(tensor)
    return model
