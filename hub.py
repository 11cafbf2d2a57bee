"""Checkpoint lookup and strict loading for every backbone, and the adaptation checkpoint's file.

resolve() turns a local folder or a hub id into a folder with config.json and one weights layout, through
huggingface_hub.hf_hub_download: one cache shared with transformers, and HF_HOME, HF_HUB_CACHE, HF_TOKEN,
HF_ENDPOINT and HF_HUB_OFFLINE as they work there. "toy/lm" names a toy backbone in this clone, wherever it is. load_state_dict() reads safetensors or pytorch_model.bin with
torch.load(weights_only=True, mmap=True), never a full unpickle, memory-mapped; load_weights() puts them
strictly into a model built on the meta device, cast one tensor at a time, so a large LM is never held twice in
memory, and into FSDP2-sharded blocks only the rows each process keeps; build() quantizes linear layers as their
weights are read (quantize.py). save_adapter() and load_adapter() write
and read what eP-ALM trains, with the run's configuration as safetensors metadata; adapter_path() finds that file
in a run's folder or downloads it from a hub repository, as resolve() downloads a backbone.

References: huggingface_hub's hf_hub_download, try_to_load_from_cache and cache layout (models--{org}--{name}/
refs/main, snapshots/{commit}/, .no_exist/{commit}/); the safetensors format (huggingface.co/docs/safetensors);
torch.load's weights_only unpickler.
"""
import json
import os
import pickle
import re
from pathlib import Path

import torch
# _CACHED_NO_EXIST is try_to_load_from_cache's "known missing" answer: exported in huggingface_hub's __all__ and
# imported so in that function's own documented example; the package gives it no name without the underscore
from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import quantize
import toy

# in order of preference; an index names its shards in "weight_map"
WEIGHT_LAYOUTS = ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
ADAPTER_FILE = "ckpt.safetensors"  # what train.py writes in a run's folder, and what a shared adapter's repo holds


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


def toy_backbone(name: str) -> Path | None:
    """This clone's toy/<x> for a name of the miniature world's backbone x: "toy/x", as checkpoints record them so
    that they load in any clone, or a path into another clone's toy/ that no longer exists (how older
    checkpoints recorded them: /home/me/epalm/toy/lm after that clone moved)."""
    path = Path(name)
    if path.parts[:1] == ("toy",) and len(path.parts) == 2:
        return toy.TOY_DIR / path.name
    if path.parent.name == "toy" and not path.exists() and (toy.TOY_DIR / path.name).is_dir():
        return toy.TOY_DIR / path.name
    return None


def resolve(name_or_path: str, extra_files: tuple[str, ...] = (), config: str = "config.json",
            layouts: tuple[str, ...] = WEIGHT_LAYOUTS) -> Path:
    """A local folder as is; for a hub id, its snapshot folder in the Hugging Face cache, holding config, the
    first of layouts the hub has (an index with its shards) and whichever of extra_files the repo has.
    Offline (HF_HUB_OFFLINE) or when the hub cannot be reached, what the cache holds."""
    name_or_path = toy_backbone(name_or_path) or name_or_path
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    repo = str(name_or_path)
    if not REPO_ID.fullmatch(repo):
        raise FileNotFoundError(f"{name_or_path}: no such folder, and not a hub id like 'facebook/opt-125m'")
    unreachable = None  # why the hub cannot be asked; once known, only the cache is read

    def get(name: str, required: bool = False) -> Path | None:
        nonlocal unreachable
        # the hub said 404 at the cached commit, which config.json's download brought up to date: ask no more
        if not required and try_to_load_from_cache(repo, name) is _CACHED_NO_EXIST:
            return None
        try:
            return Path(hf_hub_download(repo, name, local_files_only=unreachable is not None))
        except LocalEntryNotFoundError as e:  # first: it is an EntryNotFoundError before huggingface_hub 1.0
            cause = e.__cause__ or e
            unreachable = unreachable or ("offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else
                                          f"hub unreachable ({type(cause).__name__}: {str(cause).splitlines()[0]})")
            error = ConnectionError(f"cannot download {repo}/{name}: {unreachable} and not in the Hugging Face "
                                    "cache; pass a local folder or download it once with network")
        except EntryNotFoundError:
            error = FileNotFoundError(f"{repo}/{name}: not on the hub")
        except HfHubHTTPError as e:
            if isinstance(e, RepositoryNotFoundError) or getattr(e.response, "status_code", None) == 401:
                raise FileNotFoundError(f"{repo}: no such folder, nor a repository on the hub that this machine "
                                        "can read (private or gated? set HF_TOKEN)") from None
            raise ConnectionError(f"cannot download {repo}/{name}: {str(e).splitlines()[0]}") from e
        if required:
            raise error from None
        return None

    folder = get(config, required=True).parent
    layout = next((name for name in layouts if get(name)), None)
    if layout is None and layouts:
        raise FileNotFoundError(f"{repo}: no weights on the hub or in the cache "
                                f"(looked for {', '.join(layouts)})")
    for name in _shards(folder, layout) if layout and layout.endswith(".index.json") else []:
        get(name, required=True)
    for name in extra_files:
        get(name)
    return folder


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in folder, keys as stored, memory-mapped from the files rather than read
    (safetensors' get_tensor and torch.load(mmap=True) on CPU): load_weights casts and places them one at a time,
    or only the rows this process keeps when sharded."""
    folder = Path(folder)
    name = next((n for n in WEIGHT_LAYOUTS if (folder / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{folder}: no weights (looked for {', '.join(WEIGHT_LAYOUTS)})")
    if not name.endswith(".index.json"):
        return _read_weights(folder / name)
    weight_map = read_json(folder, name)["weight_map"]
    state = {}
    for shard in _shards(folder, name):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard}: shard listed in {name} is missing")
        state.update(_read_weights(folder / shard))
    lost = [k for k in weight_map if k not in state]
    if lost:
        raise ValueError(f"{folder / name}: {len(lost)} keys of the index are in none of its shards: {lost[:10]}")
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused, it holds objects other than tensors (read with weights_only=True): "
                         f"{str(e).splitlines()[0]}") from e
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__} with other values")
    return state


def build(cls, config, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None, shard=None,
          source: str = "", quantization: quantize.Quantization | None = None) -> torch.nn.Module:
    """How every backbone's from_pretrained makes its model: cls(config) on the meta device (no memory), shard
    applied before any weight is read (FSDP units, see distributed.py), or its linear layers quantized as their
    weights are read (quantize.py), then state loaded in strictly, in dtype (default float32), in eval mode."""
    with torch.device("meta"):
        model = cls(config)
    if shard is not None and quantization is not None:
        raise ValueError(f"{source or cls.__name__}: quantized weights cannot be sharded: FSDP2 shards floating-point "
                         "parameters, and the quantized weights are integer buffers it would copy whole to every "
                         "process")
    if shard is not None:
        shard(model)
    if quantization is not None:
        state = quantize.quantize_linears(model, state, quantization, dtype or torch.float32, source)
    return load_weights(model, state, dtype or torch.float32, source=source).eval()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 source: str = "") -> torch.nn.Module:
    """Put state's tensors into model (built on the meta device, or not), strictly, casting floating tensors to
    dtype (default: the model's) one at a time. A parameter tied under several names needs only one of them.
    A parameter FSDP2 sharded on the meta device takes only this process's rows, cut as FSDP2 cuts them
    (torch.chunk along dim 0): with memory-mapped state, only those rows are ever read, cast and moved."""
    expected = model.state_dict(keep_vars=True)  # on the meta device: names, shapes and dtypes without memory
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
    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    if mesh is None:  # assigned, cast one at a time; one already in its dtype stays memory-mapped: no copy at all
        for k, c in take.items():
            state[c] = state[c].to(dtype if dtype is not None and expected[k].is_floating_point() else
                                   expected[k].dtype)
        model.load_state_dict({k: state[c] for k, c in take.items()}, strict=True, assign=True)
    else:  # FSDP2 allocates each process's shard: filled in place below
        device = "cpu" if mesh.device_type == "cpu" else \
            torch.device(mesh.device_type, torch.accelerator.current_device_index())
        (model.to(dtype) if dtype else model).to_empty(device=device)
    for names in tied.values():  # assign (or a dtype change on meta) gave each name its own Parameter: tie again
        for n in names[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(names[0]))
    if mesh is not None:
        _fill_shards(model, {k: state[c] for k, c in take.items()}, mesh)
    return model


def _fill_shards(model: torch.nn.Module, state: dict[str, torch.Tensor], mesh) -> None:
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, tensor in state.items():
            target = targets[k]
            if hasattr(target, "device_mesh"):
                rows = tensor.chunk(mesh.size(), dim=0)
                tensor = rows[mesh.get_local_rank()] if mesh.get_local_rank() < len(rows) else tensor[:0]
                target = target.to_local()
            target.copy_(tensor)


def save_adapter(model: torch.nn.Module, path, run_config: dict) -> None:
    """Only what trains (a few MB) as safetensors, with the run's configuration as metadata. Written to a
    temporary file and renamed, so an interrupted save never damages the previous checkpoint."""
    path = Path(path)
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"config": json.dumps(run_config)})
    os.replace(tmp, path)


def load_adapter(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(adaptation parameters, run configuration) from a save_adapter file."""
    try:
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "null"))
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ValueError(f"{path}: not a readable eP-ALM checkpoint ({e})") from None
    if not isinstance(config, dict) or "epalm" not in config:
        raise ValueError(f"{path}: no eP-ALM run configuration in its metadata")
    return state, config


def adapter_path(name_or_path: str) -> Path:
    """The adaptation checkpoint a user names: the file, a run's folder holding it, or a hub repository holding
    it (downloaded into the Hugging Face cache as resolve() downloads a backbone, with HF_TOKEN, HF_ENDPOINT
    and HF_HUB_OFFLINE)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} in this folder (not a training run's out_dir?)")
        return path / ADAPTER_FILE
    if not REPO_ID.fullmatch(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path}: no checkpoint (no such file or folder, and not a hub id like "
                                "USER/NAME)")
    return resolve(str(name_or_path), config=ADAPTER_FILE, layouts=()) / ADAPTER_FILE
