"""What a fine-tuning run leaves to read: the loss curve (PNG), and a report (Markdown and HTML)
with eval loss and perplexity before and after and base vs fine-tuned answers to held-out
prompts."""

from __future__ import annotations

import html
import json
from pathlib import Path

from finetune.estimate import format_bytes
from finetune.inference import complete
from finetune.render import held_out_prompt


def collect_samples(peft_model, data, n: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers to the first `n` held-out prompts, without and with the adapter."""
    samples = []
    peft_model.eval()
    for conversation in data.eval_conversations[:n]:
        prompt, reference = held_out_prompt(data.tokenizer, conversation)
        with peft_model.disable_adapter():
            base = complete(peft_model, data.tokenizer, prompt, max_new_tokens)
        tuned = complete(peft_model, data.tokenizer, prompt, max_new_tokens)
        samples.append({"prompt": prompt, "reference": reference, "base": base, "finetuned": tuned})
    return samples


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy on trained tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary_rows(report: dict) -> list[tuple[str, str]]:
    rows = [
        ("base model", str(report["model"])),
        ("method", f"{report['method']} on {report['device']}"),
        (
            "trainable parameters",
            f"{report['trainable_parameters']:,} "
            f"({100 * report['trainable_parameters'] / report['total_parameters']:.2f}% of the "
            f"base model's {report['total_parameters']:,})",
        ),
        ("rows (train / eval)", f"{report['train_rows']} / {report['eval_rows']}"),
        ("steps", str(report["steps"])),
        ("training time", f"{report['train_seconds']:.1f} s"),
        ("memory (estimated)", format_bytes(report["estimated_memory_bytes"])),
        (
            "eval loss",
            f"{report['eval_loss_before']:.4f} → {report['eval_loss_after']:.4f} "
            f"({100 * report['eval_loss_drop']:.1f}% lower)",
        ),
        ("eval perplexity", f"{report['eval_ppl_before']:.3f} → {report['eval_ppl_after']:.3f}"),
    ]
    if report.get("peak_gpu_memory_bytes"):
        rows.append(("GPU memory (peak allocated)", format_bytes(report["peak_gpu_memory_bytes"])))
    return rows


def _markdown(report: dict) -> str:
    lines = ["# Fine-tuning report", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    lines += [
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Held-out prompts: base vs fine-tuned",
        "",
    ]
    for i, s in enumerate(report["samples"], 1):
        lines += [f"### Sample {i}", "", "Prompt:", "", "```text", s["prompt"], "```", ""]
        lines += ["| reference | base model | fine-tuned |", "| --- | --- | --- |"]
        cells = [_md_cell(s[k]) for k in ("reference", "base", "finetuned")]
        lines += ["| " + " | ".join(cells) + " |", ""]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return (text.strip() or "(empty)").replace("|", "\\|").replace("\n", "<br>")


def _html(report: dict) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary_rows(report))
    samples = "".join(
        f"<h3>Sample {i}</h3><pre>{esc(s['prompt'])}</pre>"
        "<table class=cmp><tr><th>reference</th><th>base model</th><th>fine-tuned</th></tr>"
        f"<tr><td>{esc(s['reference'])}</td><td>{esc(s['base'])}</td>"
        f"<td>{esc(s['finetuned'])}</td></tr></table>"
        for i, s in enumerate(report["samples"], 1)
    )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left;vertical-align:top}.cmp td{width:33%;white-space:pre-wrap}"
        "pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}"
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Fine-tuning report</title>"
        f"<style>{style}</style></head><body><h1>Fine-tuning report</h1><table>{rows}</table>"
        f"<p><img src='loss_curve.png' alt='loss curve'></p>"
        f"<h2>Held-out prompts: base vs fine-tuned</h2>{samples}</body></html>\n"
    )


def write_report(report: dict, out_dir: Path) -> None:
    """report.json, loss_curve.png, report.md and report.html in out_dir."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics = read_metrics(out_dir / "metrics.jsonl")
    plot_loss_curve(metrics, out_dir / "loss_curve.png", f"{report['method']} on {report['model']}")
    (out_dir / "report.md").write_text(_markdown(report), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(report), encoding="utf-8")
