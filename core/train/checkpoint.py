"""Training checkpoints that survive a kill: each is a folder written under a temp name and renamed
into place, holding a loadable model (Hugging Face layout), the optimizer state and the step.

The optimizer state goes into safetensors plus JSON rather than `torch.save`, so resuming never
unpickles anything. Pruning renames a checkpoint away before deleting it, and discovery skips any
folder without its weights, so a kill at any moment leaves the newest complete checkpoint to
resume from.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_module_file
from safetensors.torch import save_model as save_module_file

from core.atomic import atomic_directory, clean_stale_temps, delete_directory
from core.killpoints import killpoint
from core.lm.loader import naming_write_errors, write_model_files
from core.lm.model import GPT

MODULE_FILE = "module.safetensors"
# What a resume reads besides the weights (module.safetensors, or model.safetensors + config.json).
STATE_FILES = ("trainer_state.json", "optimizer.safetensors", "optimizer.json")
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_warned: set[str] = set()  # one warning per broken checkpoint per process, however often listed


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
    """Write checkpoints/step_NNNNNNN atomically, then prune all but the newest `keep` complete
    ones (and any incomplete one). Configs require keep >= 1; a smaller value keeps every
    checkpoint rather than failing a run mid-way.

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
        # A full disk names the checkpoint file it hit, not the temporary folder's copy.
        with naming_write_errors(path / "optimizer.safetensors"):
            save_file(tensors, tmp / "optimizer.safetensors")
        with naming_write_errors(path / "trainer_state.json"):
            (tmp / "optimizer.json").write_text(json.dumps(meta))
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}))
        killpoint("checkpoint-save", step)  # tests: killed with the folder not yet renamed in
    ckpts = list_checkpoints(out_dir)
    complete = [p for p in ckpts if not missing_files(p)]
    if keep >= 1:
        for old in [p for p in ckpts if p not in complete] + complete[:-keep]:
            try:
                delete_directory(old)  # renamed away first: a kill mid-delete leaves no husk
            except OSError as e:  # a full or read-only disk must not stop the training
                print(f"warning: {old}: could not prune ({e})", file=sys.stderr)
    clean_stale_temps(root)  # dead writers' temps and deletion folders, never a live one's
    return path


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Every checkpoints/step_NNNNNNN folder, oldest first, complete or not."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def missing_files(path: Path) -> list[str]:
    """Files a resume needs that the checkpoint folder lacks ([] when it is complete)."""
    path = Path(path)
    missing = [name for name in STATE_FILES if not (path / name).is_file()]
    if not (path / MODULE_FILE).is_file():
        missing += [n for n in ("model.safetensors", "config.json") if not (path / n).is_file()]
    return missing


def clean_run_folder(out_dir: Path) -> None:
    """Undo what a killed run left in out_dir and out_dir/checkpoints: deletion folders and dead
    writers' temp files/folders are removed, a folder swap cut between its renames is finished.
    Says what it did in one line per folder (on stderr)."""
    for folder in (Path(out_dir), Path(out_dir) / "checkpoints"):
        try:
            done = clean_stale_temps(folder)
        except OSError as e:  # e.g. a read-only copy of a run: still readable as it is
            print(
                f"warning: {folder}: could not clean up after a killed run ({e})", file=sys.stderr
            )
            continue
        if done:
            print(f"{folder}: left by a killed run: {'; '.join(done)}", file=sys.stderr)


def refuse_unresumed_checkpoints(out_dir: Path, has_checkpoints: bool, resume: bool) -> None:
    """A run folder that already holds checkpoints is continued only with --resume: without it,
    FileExistsError (a new run must not train over, and then prune, another run's checkpoints).
    Whatever the checkpoints are (ours, or a TRL trainer's in finetune), the rule is this one."""
    if has_checkpoints and not resume:
        raise FileExistsError(
            f"{out_dir} already has checkpoints: pass --resume to continue, or pick another "
            "--output-dir"
        )


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest complete checkpoint. Every stage calls this at start-up, so it first cleans up
    after a killed run (`clean_run_folder`); a step folder missing a file it needs (a pruning
    killed mid-delete by older code) is skipped with a one-line warning."""
    clean_run_folder(out_dir)
    for path in reversed(list_checkpoints(out_dir)):
        missing = missing_files(path)
        if not missing:
            return path
        if str(path) not in _warned:
            _warned.add(str(path))
            print(
                f"warning: {path}: incomplete checkpoint (no {', '.join(missing)}), skipped",
                file=sys.stderr,
            )
    return None


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer from a checkpoint folder; return its trainer state (with `step`)."""
    tensors = load_file(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer_from_tensors(optimizer, tensors, meta)
    return json.loads((path / "trainer_state.json").read_text())


def load_module_state(path: Path, module: torch.nn.Module) -> None:
    """Restore a module saved by `save_checkpoint` as `module.safetensors` (strict: every key)."""
    load_module_file(module, str(Path(path) / MODULE_FILE))
