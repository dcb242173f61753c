"""The fine-tuning config: one dataclass, filled from YAML (`--config`) and then from flags.

Every field is also a command-line flag (`--lora-rank 16`, `--target-modules q_proj,v_proj`);
the help text of each flag is the `help` below. Unknown keys are errors with a suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    # what
    model: str = _f("tutor-base", "Base model: shipped name, local folder or Hub id (online).")
    data: str | None = _f(None, "Training data: .jsonl, .json, .csv or .parquet file.")
    format: str = _f("auto", "auto, alpaca, messages, prompt_completion or text.")
    eval_data: str | None = _f(None, "Held-out data file (default: split off --eval-fraction).")
    eval_fraction: float = _f(0.1, "Share of rows held out for evaluation without --eval-data.")
    output_dir: str = _f("runs/finetune", "Where checkpoints, the adapter and the report go.")
    chat_template: str | None = _f(None, "Jinja chat template file (default: the model's own).")
    # method
    method: str = _f("lora", "lora (frozen base in 16/32 bits) or qlora (frozen base in 4 bits).")
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
    eval_steps: int | None = _f(None, "Evaluate every N steps (default: 5 times per run).")
    save_steps: int | None = _f(None, "Checkpoint every N steps (default: 5 times per run).")
    save_total_limit: int = _f(2, "Checkpoints kept (the newest).")
    num_samples: int = _f(4, "Held-out prompts in the report (base vs fine-tuned).")
    sample_max_new_tokens: int = _f(48, "Tokens generated per report sample.")
    skip_invalid: bool = _f(False, "Drop bad rows (written to rejects.jsonl) instead of stopping.")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub to run.")

    def validate(self) -> None:
        from finetune.data import FORMATS

        if not self.data:
            raise ValueError("no training data: pass --data FILE or set `data:` in the config")
        if self.method not in ("lora", "qlora"):
            raise ValueError(f"method must be lora or qlora, got {self.method!r}")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}")
        positive = ["lora_rank", "batch_size", "gradient_accumulation", "logging_steps"]
        positive += ["max_steps", "eval_steps", "save_steps", "max_length", "save_total_limit"]
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def config_fields() -> list:
    """The dataclass fields, for building one command-line flag per key."""
    return list(fields(FinetuneConfig))
