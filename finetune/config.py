"""The fine-tuning config: one dataclass, filled from YAML (`--config`) and then from flags.

Every field is also a command-line flag (`--lora-rank 16`, `--target-modules q_proj,v_proj`);
the help text of each flag is the `help` below. Unknown keys are errors with a suggestion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from finetune.data import FORMATS, format_help


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    # what
    model: str = _f("tutor-base", "Base model: shipped name, local folder or Hub id (online).")
    data: str | None = _f(None, "Training data: .jsonl, .json, .csv or .parquet file.")
    format: str = _f("auto", format_help())  # the formats of finetune.data.DATA_FORMATS
    columns: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Our field -> your file's column, e.g. instruction=question,output=answer or "
            "conversations=dialog,role=speaker,content=text."
        },
    )
    roles: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Your speaker names -> system/user/assistant, e.g. "
            "customer=user,agent=assistant."
        },
    )
    eval_data: str | None = _f(None, "Held-out data file (default: split off --eval-fraction).")
    eval_fraction: float = _f(0.1, "Share of rows held out for evaluation without --eval-data.")
    output_dir: str = _f("runs/finetune", "Where checkpoints, the adapter and the report go.")
    chat_template: str | None = _f(None, "Jinja chat template file (default: the model's own).")
    # method
    method: str = _f(
        "lora",
        "lora (frozen base in 16/32 bits), qlora (frozen base in 4 bits) or dpo (a LoRA adapter "
        "trained on prompt/chosen/rejected preference pairs).",
    )
    beta: float = _f(0.1, "DPO: how far the adapter may move from the base (higher: less far).")
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Layers to adapt, comma-separated (auto: all)."}
    )
    lora_rank: int = _f(8, "LoRA rank r: the inner size of the two small matrices.")
    lora_alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    double_quant: bool = _f(True, "QLoRA: quantize the 4-bit block constants too.")
    # optimisation
    learning_rate: float = _f(2e-4, "Peak learning rate (AdamW).")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warmup (transformers' names).")
    warmup_ratio: float = _f(0.05, "Share of the steps spent warming up.")
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapter.")
    epochs: float = _f(3.0, "Passes over the training rows (ignored when --max-steps is set).")
    max_steps: int | None = _f(None, "Optimizer steps (overrides --epochs).")
    batch_size: int = _f(4, "Rows per micro-batch (per device).")
    gradient_accumulation: int = _f(1, "Micro-batches per optimizer step.")
    max_length: int | None = _f(None, "Longest row in tokens (default: the model's context).")
    truncate: bool = _f(False, "Cut over-long rows instead of rejecting them.")
    train_on_prompt: bool = _f(False, "Also train on prompt tokens (default: completions only).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    seed: int = _f(42, "Random seed (adapter init, data order, split).")
    device: str = _f("auto", "auto, cpu or cuda.")
    # bookkeeping
    logging_steps: int = _f(5, "Log the training loss every N steps.")
    eval_steps: int | None = _f(
        None,
        "Evaluate every N steps (default: about 5 times per run; runs of 5 steps or fewer "
        "only at the end).",
    )
    save_steps: int | None = _f(
        None, "Checkpoint every N steps, a multiple of --eval-steps (default: at every evaluation)."
    )
    save_total_limit: int = _f(2, "Checkpoints kept: the newest, and always the best by eval loss.")
    max_eval_rows: int | None = _f(
        200, "Evaluation rows at most (a seeded sample of the held-out rows); null: all of them."
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after N evaluations without a lower eval loss (default: never stop early)."
    )
    report_to: str = field(
        default_factory=lambda: default_report_to(),  # defined below the class
        metadata={
            "help": "Also send metrics to: none, tensorboard, wandb, mlflow... (transformers' "
            "report_to, comma-separated; default: tensorboard if installed, else none)."
        },
    )
    num_samples: int = _f(4, "Held-out prompts in the report (base vs fine-tuned).")
    sample_max_new_tokens: int = _f(48, "Tokens generated per report sample.")
    skip_invalid: bool = _f(False, "Drop bad rows (written to rejects.jsonl) instead of stopping.")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub to run.")

    def validate(self, require_data: bool = True) -> None:
        """Raise ConfigError `key: got X, must be ...` for the first unusable value, before any
        model or data loads. `require_data=False` for `--dry-run`, which can estimate a model
        alone."""
        from transformers.trainer_utils import SchedulerType  # the schedules Trainer knows

        from core.train.config import ConfigError
        from finetune.base_model import pick_device

        if require_data and not self.data:
            raise ConfigError(
                "data: no training data: pass --data FILE or set `data:` in the config"
            )
        for key, path in (("data", self.data), ("eval_data", self.eval_data)):
            if path is not None and not str(path).strip():
                raise ConfigError(f"{key}: got {path!r}, must be a data file")
        choices = {
            "method": ("lora", "qlora", "dpo"),
            "format": ("auto", *FORMATS),
            "lr_scheduler": tuple(s.value for s in SchedulerType),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{key}: got {getattr(self, key)!r}, must be one of {', '.join(allowed)}"
                )
        for key, (ok, rule) in _RULES.items():
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key}: got {value!r}, must be {rule}")
        if self.method == "dpo":  # preference rows have one fixed layout: prompt/chosen/rejected
            for key in ("columns", "roles"):
                if getattr(self, key):
                    raise ConfigError(
                        f"{key}: not supported with method dpo (prompt/chosen/rejected rows)"
                    )
            if self.format != "auto":
                raise ConfigError(
                    f"format: got {self.format!r}, method dpo reads prompt/chosen/rejected rows; leave it auto"
                )
        if self.save_steps and self.eval_steps and self.save_steps % self.eval_steps:
            # transformers keeps the best checkpoint only among evaluated ones
            raise ConfigError(
                f"save_steps: got {self.save_steps}, must be a multiple of eval_steps "
                f"({self.eval_steps}) so every checkpoint has an eval loss to rank it by"
            )
        check_report_to(self.report_to)
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs: got {self.epochs!r}, must be > 0 (or set max_steps)")
        pick_device(self.device)  # a typo or a missing GPU fails now, not after the data check


def default_report_to() -> str:
    """TensorBoard when its package is installed (the metrics then also land in
    OUTPUT_DIR/tensorboard), else none: JSONL and the loss curve only."""
    from importlib.util import find_spec

    return "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else "none"


def report_targets(value: str) -> list[str]:
    """`report_to` as transformers' list: "none" -> [], "tensorboard,wandb" -> both."""
    return [name for v in value.split(",") if (name := v.strip()) and name != "none"]


def check_report_to(value: str) -> None:
    """Known integration names only, and each one installed: one line saying which is missing
    (transformers would fail later, at trainer creation, with a longer message)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from core.train.config import ConfigError

    known = ("none", "all", *INTEGRATION_TO_CALLBACK)
    for name in report_targets(value):
        if name not in known:
            raise ConfigError(f"report_to: got {name!r}, must be one of {', '.join(known)}")
        if name != "all" and name not in get_available_reporting_integrations():
            package = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}.get(name, name)
            raise ConfigError(
                f"report_to: {name} is not installed (pip install {package}), or pass "
                "--report-to none"
            )


def _finite(check: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and check(v)


# key -> (check, what the message says it must be); None values are skipped (optional keys).
_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{
        key: (lambda v: v >= 1, ">= 1")
        for key in (
            "lora_rank",
            "batch_size",
            "gradient_accumulation",
            "logging_steps",
            "max_steps",
            "eval_steps",
            "save_steps",
            "max_length",
            "save_total_limit",
            "sample_max_new_tokens",
            "max_eval_rows",
            "early_stopping_patience",
        )
    },
    "num_samples": (lambda v: v >= 0, ">= 0"),
    "lora_alpha": (_finite(lambda v: v > 0), "> 0"),
    "beta": (_finite(lambda v: v > 0), "> 0"),
    "lora_dropout": (_finite(lambda v: 0 <= v < 1), "in [0, 1)"),
    "learning_rate": (_finite(lambda v: v > 0), "> 0"),
    "warmup_ratio": (_finite(lambda v: 0 <= v < 1), "in [0, 1)"),
    "weight_decay": (_finite(lambda v: v >= 0), ">= 0"),
    "eval_fraction": (_finite(lambda v: 0 < v < 1), "between 0 and 1 (exclusive)"),
}


def config_fields() -> list:
    """The dataclass fields, for building one command-line flag per key."""
    return list(fields(FinetuneConfig))
