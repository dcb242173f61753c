"""The Fine-tune page's logic: take a dataset (upload or bundled example), check it with the
finetune linter, preview the trained tokens, estimate the cost, build the `genai-lab finetune`
command the job runner starts, and read back what the run wrote (metrics, report, adapter).

No Streamlit here; every function raises a one-line error (UploadError, DataError, ValueError)
that the page shows as it is."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.atomic import atomic_file
from finetune.data import SFT_FORMATS, SUFFIXES, or_list

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "finetune" / "examples" / "data"
MODELS = ("tutor-base", "smollm2-135m-instruct")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a page upload is for small datasets; big ones: the CLI
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")  # parquet is binary; the rest must be UTF-8
PREVIEW_ROWS = 3


def upload_label() -> str:
    """The upload box's label: file types, every format the checker reads, the size limit."""
    names = or_list([f.name for f in SFT_FORMATS])
    return f"Rows as {', '.join(SUFFIXES)} ({names}; up to {MAX_UPLOAD_BYTES // 2**20} MB)"


def formats_markdown() -> str:
    """A table of the formats (finetune.data.DATA_FORMATS, the SFT ones): the columns that
    identify each, what they hold, and an example row."""
    lines = ["| format | columns | example row |", "| --- | --- | --- |"]
    for f in SFT_FORMATS:
        example = json.dumps(f.example, ensure_ascii=False).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {f.description} | `{example}` |")
    return "\n".join(lines)


class UploadError(ValueError):
    """An uploaded file the page cannot use: one line saying why."""


def examples() -> dict[str, Path]:
    """The bundled example datasets by file name (broken.jsonl shows what the checker catches)."""
    return {p.name: p for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix in SUFFIXES}


def save_upload(name: str, data: bytes, folder: Path) -> Path:
    """Check an upload's size, type and encoding, and store it under `folder` by content hash,
    so a job started from it keeps reading the same bytes after the page is gone."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise UploadError(f"{name}: not a dataset file; use {', '.join(SUFFIXES)}")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(
            f"{name}: {len(data) / 2**20:.1f} MB is over the page's "
            f"{MAX_UPLOAD_BYTES // 2**20} MB limit; use `genai-lab finetune --data FILE` for it"
        )
    if not data.strip():
        raise UploadError(f"{name}: the file is empty")
    if suffix in TEXT_SUFFIXES:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise UploadError(
                f"{name}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8 and "
                "upload it again"
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}-{_safe(Path(name).stem)}{suffix}"
    if not path.is_file():  # the same bytes uploaded again: the same file
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    return path


def _safe(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "data"


@dataclass
class DataReport:
    """The linter's verdict on one file, with locations under the name the user knows."""

    format: str
    rows: int
    good: int
    bad: int
    issues: list[str]  # "file:line: field: reason"

    @property
    def usable(self) -> bool:
        return self.bad == 0 and self.good > 0


def check_data(path: Path, shown_name: str | None = None) -> DataReport:
    """Every row through the finetune linter (no tokenizer: JSON, format, fields, duplicates).
    Raises DataError for a file that cannot be read at all."""
    from finetune.lint import check_structure, issue_lines

    check, _ = check_structure(path)
    lines = issue_lines([check])
    if shown_name:
        lines = [line.replace(str(path), shown_name, 1) for line in lines]
    return DataReport(
        check.format,
        len(check.rows),
        len(check.rows) - len(check.bad_rows),
        len(check.bad_rows),
        lines,
    )


def token_previews(path: Path, model: str, max_length: int, n: int = PREVIEW_ROWS) -> list[str]:
    """The first `n` usable rows as the model's chat template renders them, trained tokens
    between « » (finetune.render.preview: what the loss is computed on)."""
    from finetune.base_model import load_tokenizer
    from finetune.lint import check_file
    from finetune.render import ensure_chat_template, preview

    tokenizer = load_tokenizer(model)
    ensure_chat_template(tokenizer, None)
    check = check_file(path, tokenizer, max_length=max_length, truncate=True)
    return [preview(tokenizer, example) for example in check.examples[:n]]


def estimate(model: str, method: str, rank: int, batch_size: int, seq_len: int) -> dict:
    """Trainable parameters and training memory of this run, as `--dry-run` computes them
    (finetune.estimate on the model's config; no weights are loaded)."""
    from finetune.config import FinetuneConfig
    from finetune.dryrun import dry_run

    cfg = FinetuneConfig(
        model=model, method=method, lora_rank=rank, batch_size=batch_size, max_length=seq_len
    )
    result = dry_run(cfg, lambda *_: None, seq_len)
    return {
        "total_parameters": result["total_parameters"],
        "trainable_parameters": result["trainable_parameters"],
        "trainable_percent": result["trainable_percent"],
        "precision": result["this_run"],
        "memory": result[result["this_run"]],
    }


def build_argv(
    model: str,
    data: Path,
    method: str,
    rank: int,
    alpha: float,
    learning_rate: float,
    max_steps: int,
    batch_size: int,
    max_length: int,
) -> list[str]:
    """The `genai-lab finetune` command for these settings (the job runner adds --output-dir)."""
    return [
        "genai-lab", "finetune",
        "--model", model,
        "--data", str(Path(data).resolve()),
        "--method", method,
        "--lora-rank", str(rank),
        "--lora-alpha", f"{alpha:g}",
        "--learning-rate", f"{learning_rate:g}",
        "--max-steps", str(max_steps),
        "--batch-size", str(batch_size),
        "--max-length", str(max_length),
        # a point of the loss curve every step on short runs, about 50 points on long ones
        "--logging-steps", str(max(1, max_steps // 50)),
    ]  # fmt: skip


def loss_figure(metrics: list[dict]) -> go.Figure:
    """Training and eval loss over steps, and the learning rate below (its own axis)."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    rates = [(m["step"], m["learning_rate"]) for m in metrics if "learning_rate" in m]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3])
    if train:
        x, y = zip(*train, strict=True)
        fig.add_scatter(x=x, y=y, mode="lines+markers", name="training loss", row=1, col=1)
    if evals:
        x, y = zip(*evals, strict=True)
        fig.add_scatter(x=x, y=y, mode="lines+markers", name="eval loss", row=1, col=1)
    if rates:
        x, y = zip(*rates, strict=True)
        fig.add_scatter(x=x, y=y, mode="lines", name="learning rate", row=2, col=1)
    fig.update_yaxes(title_text="loss (cross-entropy)", row=1, col=1)
    fig.update_yaxes(title_text="learning rate", row=2, col=1)
    fig.update_xaxes(title_text="optimizer step", row=2, col=1)
    fig.update_layout(title="Loss while fine-tuning", height=460, margin={"t": 50, "b": 10})
    return fig


def read_report(output_dir: Path) -> dict | None:
    """report.json of a finished run (None while there is none)."""
    try:
        return json.loads((Path(output_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def zip_folder(folder: Path) -> bytes:
    """A folder (the adapter) as zip bytes, for a download button."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder).name + "/" + str(path.relative_to(folder)))
    return buffer.getvalue()


def chat_command(output_dir: Path) -> str:
    return f"genai-lab chat --model {Path(output_dir) / 'adapter'}"
