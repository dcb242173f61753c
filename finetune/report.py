"""What a fine-tuning run leaves to read: the loss curve (PNG), and a report (Markdown and HTML)
with eval loss and perplexity before and after (worded as it moved: "fell" or "rose"), which
step the adapter is from, any overfitting, and base vs fine-tuned answers to held-out prompts."""

from __future__ import annotations

import html
import json
from pathlib import Path

from core.atomic import write_text_atomic
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


# Overfitting is called when the eval loss stayed above its best for this many evaluations and
# ended at least OVERFIT_RISE above it, while the training loss kept falling.
OVERFIT_EVALS = 2
OVERFIT_RISE = 0.01


def change_words(before: float, after: float) -> str:
    """ "fell 25.0%", "rose 3.8%" or "unchanged": how a loss moved, relative to `before`."""
    change = after / before - 1
    if abs(change) < 0.0005:
        return "unchanged"
    return f"{'rose' if change > 0 else 'fell'} {100 * abs(change):.1f}%"


def overfitting(history: list[dict], evals: int = OVERFIT_EVALS) -> dict | None:
    """From transformers' log history (whole run, resumed parts too): the best evaluation,
    what came after it and the training loss over the same span, when the eval loss rose for
    `evals` evaluations while the training loss fell; else None."""
    scores = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and h["step"] > 0]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if len(scores) <= evals or not train:
        return None
    best_i = min(range(len(scores)), key=lambda i: scores[i][1])
    best_step, best = scores[best_i]
    last_step, last = scores[-1]
    after_best = len(scores) - 1 - best_i
    if after_best < evals or last < best * (1 + OVERFIT_RISE):
        return None
    # the training loss logged at or just before the best step (the first one if none was)
    at_best = next((loss for step, loss in reversed(train) if step <= best_step), train[0][1])
    train_last = train[-1][1]
    if train_last >= at_best:
        return None  # both rising: divergence (a too-high learning rate), not overfitting
    return {
        "best_step": best_step,
        "best_eval_loss": best,
        "last_step": last_step,
        "last_eval_loss": last,
        "evals_after_best": after_best,
        "train_loss_at_best": at_best,
        "train_loss_last": train_last,
    }


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(
    metrics: list[dict], path: Path, title: str, adapter_step: int | None = None
) -> Path:
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
    if adapter_step is not None and evals:
        ax.axvline(adapter_step, color="#2ca02c", ls="--", label=f"adapter (step {adapter_step})")
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
        ("steps", _steps_text(report)),
        ("training time", f"{report['train_seconds']:.1f} s"),
        ("memory (estimated)", format_bytes(report["estimated_memory_bytes"])),
        (
            "eval loss",
            f"{report['eval_loss_before']:.4f} → {report['eval_loss_after']:.4f} "
            f"({change_words(report['eval_loss_before'], report['eval_loss_after'])}; the "
            f"adapter is step {report.get('adapter_step', report['steps'])}'s)",
        ),
        ("eval perplexity", f"{report['eval_ppl_before']:.3f} → {report['eval_ppl_after']:.3f}"),
    ]
    last = report.get("eval_loss_last")
    if last is not None and report.get("adapter_step", report["steps"]) != report["steps"]:
        rows.append(("eval loss at the last step", f"{last:.4f} (step {report['steps']})"))
    if over := report.get("overfitting"):
        rows.append(
            (
                "overfitting",
                f"eval loss rose for {over['evals_after_best']} evaluations after step "
                f"{over['best_step']} ({over['best_eval_loss']:.4f} → {over['last_eval_loss']:.4f})"
                f" while training loss fell ({over['train_loss_at_best']:.4f} → "
                f"{over['train_loss_last']:.4f})",
            )
        )
    if report.get("peak_gpu_memory_bytes"):
        rows.append(("GPU memory (peak allocated)", format_bytes(report["peak_gpu_memory_bytes"])))
    return rows


def _steps_text(report: dict) -> str:
    steps = str(report["steps"])
    if report.get("stopped_early"):
        steps += f" of {report['max_steps']} (stopped early: eval loss no longer fell)"
    return steps


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
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    metrics = read_metrics(out_dir / "metrics.jsonl")
    title = f"{report['method']} on {report['model']}"
    plot_loss_curve(metrics, out_dir / "loss_curve.png", title, report.get("adapter_step"))
    write_text_atomic(out_dir / "report.md", _markdown(report))
    write_text_atomic(out_dir / "report.html", _html(report))
