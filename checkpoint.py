"""A training run's checkpoint, in its run folder:
- state.pt: everything `--init_from resume` needs to continue exactly (the adapter, the optimizer, the float16
  loss scaler, the RNG, the iteration), loaded with torch.load(weights_only=True);
- ckpt.safetensors: the adapter and the run's configuration, what sample.py and --eval_only load (hub.py);
- README.md: the model card (card.py), with the held-out scores once the run has them.
Each is written to a temporary file and renamed: a kill at any moment leaves the previous checkpoint whole.
load_model rebuilds the model from ckpt.safetensors (or a hub repository holding one): sample.py, --eval_only.
"""
import os
from pathlib import Path

import torch

import card
import configurator
import hub
from model import EPALM, EPALMConfig, load_backbones


def save(run_dir: Path, model, optimizer, scaler, config: dict, command: list[str], split: str, scores=None,
         blind=None) -> None:
    """All three files; without an optimizer (the end of a run: the weights are saved already) only the card."""
    if optimizer is not None:
        state = {"iter": config["iter"], "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "adapter": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}}
        torch.save(state, run_dir / "state.pt.tmp")
        os.replace(run_dir / "state.pt.tmp", run_dir / "state.pt")
        hub.save_adapter(model, run_dir / "ckpt.safetensors", config)
    card.write_card(run_dir, card.model_card(model, config, command, scores, blind, split))


def check_resume(run_dir: Path, quantization: dict) -> None:
    """Before anything loads: the run in run_dir was trained with this run's quantization (train.quantization()),
    or the resumed run would not be the one that was stopped."""
    if (run_dir / "ckpt.safetensors").exists():
        saved = quantization_flags(backbone_quantization(hub.load_adapter(run_dir / "ckpt.safetensors")[1]))
        if saved != quantization_flags(quantization):
            configurator.fail(f"--init_from=resume: {run_dir} was trained with {saved}, this run has "
                              f"{quantization_flags(quantization)}: resume with the same settings")


def load(run_dir: Path, model, optimizer, scaler) -> int:
    """Restore state.pt into the model's adapter, the optimizer, the scaler and the RNG; returns the iteration."""
    path = run_dir / "state.pt"
    if not path.exists():
        configurator.fail(f"--init_from=resume: no {path} (train first, or check --out_dir)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        configurator.fail(f"--init_from=resume: {path} is unreadable ({type(e).__name__}: {e})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["adapter"].items():
            if n not in params or params[n].shape != v.shape:
                configurator.fail(f"--init_from=resume: {path} does not match this configuration (parameter {n})")
            params[n].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # float16 runs only (a disabled scaler's state is empty)
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state["iter"]


def backbone_quantization(config: dict, overrides: dict | None = None) -> dict:
    """quantize (None, int8 or int4), quantize_group_size and quantize_encoder as a run configuration records
    them (train.quantization; a checkpoint older than quantization has none), under overrides."""
    q = {"quantize": None, "quantize_group_size": 128, "quantize_encoder": False}
    q.update({k: config[k] for k in q if k in config})
    q.update(overrides or {})
    mode = None if q["quantize"] == "none" else q["quantize"]
    return {**q, "quantize": mode, "quantize_encoder": bool(mode and q["quantize_encoder"])}


def quantization_flags(quantization: dict) -> str:
    """What makes the quantized backbones what they are, as train.py's flags (int8 has no groups)."""
    mode = quantization["quantize"] or "none"
    group = f" --quantize_group_size {quantization['quantize_group_size']}" if mode == "int4" else ""
    return f"--quantize {mode}{group}" + (" --quantize_encoder" if quantization["quantize_encoder"] else "")


def load_model(name_or_path, dtype: torch.dtype | None = None, shard=None, quantization: dict | None = None):
    """(EPALM, tokenizer, run configuration) rebuilt from an adaptation checkpoint (its file, a run's folder or
    a hub repository, see hub.adapter_path): its configuration names the backbones, which load as in training,
    quantized as in training unless quantization (quantize, quantize_group_size, quantize_encoder) says
    otherwise; the configuration returned says how they were loaded."""
    path = hub.adapter_path(name_or_path)
    state, config = hub.load_adapter(path)
    config = {**config, **backbone_quantization(config, quantization)}
    try:
        lm, tokenizer, encoder = load_backbones(config["modality"], config["lm"], config["encoder"], dtype, shard,
                                                config["quantize"], config["quantize_group_size"],
                                                config["quantize_encoder"])
    except (OSError, ValueError) as e:  # ConnectionError and FileNotFoundError are OSErrors
        raise (ValueError if isinstance(e, ValueError) else OSError)(
            f"{name_or_path}: the backbones it names do not load: {e}") from None
    # an adapter saved before media_tokens existed was trained with one token per level
    model = EPALM(lm, encoder, EPALMConfig(**{"media_tokens": 1, **config["epalm"]}))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(set(trainable) ^ set(state)) + [n for n in state if n in trainable and
                                                  state[n].shape != trainable[n].shape]
    if bad:
        raise ValueError(f"{path}: parameters do not match the model it names: {', '.join(bad)}")
    model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer, config
