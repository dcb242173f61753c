"""Training checkpoints that survive a kill: each is a folder written under a temp name and renamed
into place, holding a loadable model (Hugging Face layout), the optimizer state and the step.

The optimizer state goes into safetensors plus JSON rather than `torch.save`, so resuming never
unpickles anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_module_file
from safetensors.torch import save_model as save_module_file

from core.model import GPT
from core.models import atomic_directory, write_model_files

MODULE_FILE = "module.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{7})$")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and plain data (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: GPT | torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    tokenizer=None,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step_NNNNNNN atomically, then prune all but the newest `keep`.

    A GPT is written as a Hugging Face folder; any other module (a GPT with an extra head, for
    the later training stages) as `module.safetensors`, restored by `load_module_state`."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:07d}"
    with atomic_directory(path) as tmp:
        if isinstance(model, GPT):
            write_model_files(model, tmp, tokenizer)
        else:
            # save_model (not save_file) because tied embeddings share one tensor.
            save_module_file(model, str(tmp / MODULE_FILE))
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}))
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    return path


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest complete checkpoint (temp folders of an interrupted write are never listed)."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer from a checkpoint folder; return its trainer state (with `step`)."""
    tensors = load_file(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer_from_tensors(optimizer, tensors, meta)
    return json.loads((path / "trainer_state.json").read_text())


def load_module_state(path: Path, module: torch.nn.Module) -> None:
    """Restore a module saved by `save_checkpoint` as `module.safetensors` (strict: every key)."""
    load_module_file(module, str(Path(path) / MODULE_FILE))
