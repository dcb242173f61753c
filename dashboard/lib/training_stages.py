"""Data and figures for the training-stages page: the shipped stages' answers side by side, their
training curves, the pipeline's figures, and the human-feedback lab's candidate answers."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from core.lm.generate import PromptTooLongError, answer
from core.lm.loader import PRETRAINED_DIR
from core.lm.sampling import SamplingParams
from core.train.stages.feedback import FeedbackStore

STAGES = (
    ("tutor-base", "1. base (pre-trained)"),
    ("tutor-sft", "2. SFT"),
    ("tutor-rlhf", "3. RLHF (PPO)"),
)
CURVES = {
    "tutor-base": ("loss", "eval_loss"),
    "tutor-sft": ("loss", "eval_loss"),
    "tutor-rlhf": ("reward", "kl", "entropy", "clip_fraction"),
}


def shipped_stages() -> list[tuple[str, str]]:
    return [
        (name, label) for name, label in STAGES if (PRETRAINED_DIR / name / "config.json").is_file()
    ]


def read_metrics(name: str) -> pd.DataFrame:
    """A shipped stage's metrics.jsonl as a table (one row per logged step)."""
    path = PRETRAINED_DIR / name / "metrics.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(x) for x in path.read_text().splitlines() if x.strip()])


def curve_figure(frame: pd.DataFrame, keys: tuple[str, ...], title: str) -> go.Figure:
    fig = go.Figure()
    for key in keys:
        if key in frame:
            rows = frame.dropna(subset=[key])
            fig.add_trace(go.Scatter(x=rows["step"], y=rows[key], mode="lines+markers", name=key))
    fig.update_layout(title=title, xaxis_title="step", height=320, margin={"t": 40, "b": 30})
    return fig


def pipeline_figures(folder: Path = PRETRAINED_DIR / "tutor-rlhf") -> dict | None:
    path = folder / "pipeline_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def figures_table(metrics: dict) -> pd.DataFrame:
    stages = list(metrics["key_term_accuracy"])
    rows = {"key-term accuracy (held-out questions)": metrics["key_term_accuracy"]}
    rows["mean reward-model score (sampled answers)"] = metrics.get("reward", {})
    rows["KL to the SFT model per answer (nats)"] = metrics.get("kl_to_sft", {})
    rows["reward model prefers it over SFT"] = metrics.get("rm_prefers_over_sft", {})
    rows["sampled answers ending with filler"] = metrics.get("padded_share", {})
    return pd.DataFrame({k: [v.get(s) for s in stages] for k, v in rows.items()}, index=stages).T


# How many answers the models generated in this process: the tests check that a rerun with the
# same inputs is served from the cache (a real count, not a mock).
ANSWER_CALLS = {"count": 0}


def _answer(model, tok, question: str, temperature: float, seed: int) -> str:
    ANSWER_CALLS["count"] += 1
    return answer(
        model,
        tok,
        question,
        sampling=SamplingParams(temperature=temperature, seed=seed, max_tokens=60),
    )


def answers_side_by_side(
    models: dict, question: str, temperature: float, seed: int, cache: dict | None = None
) -> dict:
    """{stage label: answer} for one question; models maps label -> (model, tokenizer). With
    `cache` (a dict the page keeps in session state), an answer already generated for the same
    (label, question, temperature, seed) is reused: every widget change reruns the page, and
    three models' answers took 3-4 s."""
    replies = {}
    for label, (model, tok) in models.items():
        key = (label, question, float(temperature), int(seed))
        if cache is not None and key in cache:
            replies[label] = cache[key]
            continue
        replies[label] = _answer(model, tok, question, temperature, seed)
        if cache is not None:
            cache[key] = replies[label]
    return replies


def fresh_seed() -> int:
    """A new seed per "Sample answers" click: a fixed seed gave the same answers every time."""
    return secrets.randbelow(2**31 - 1)


def candidate_answers(model, tokenizer, question: str, n: int, seed: int) -> list[str]:
    """`n` different sampled answers to rank (temperature 1.2 for variety; duplicates dropped)."""
    seen: list[str] = []
    for i in range(n * 4):
        text = _answer(model, tokenizer, question, 1.2, seed + i)
        if text and text not in seen:
            seen.append(text)
        if len(seen) == n:
            break
    return seen


def question_error(error: ValueError) -> str:
    """The one line the page shows instead of a traceback when a question cannot be answered."""
    if isinstance(error, PromptTooLongError):
        return f"The question is too long for the tutor, shorten it: {error}."
    return f"The tutor cannot answer this question: {error}"


def save_ranking(db: Path, prompt: str, answers: list[str], order: list[int]) -> tuple[str, str]:
    """Store the lab's ranking; (Streamlit message kind, one line) to show. Saving the same
    ranking twice adds nothing (its pairs would count twice) and says so."""
    try:
        with FeedbackStore(db) as store:
            existing = store.find(prompt, answers, order)
            if existing is not None:
                return "info", f"Already saved as comparison {existing}; nothing added."
            store.record(prompt, answers, order)
            return "success", f"Saved. The store now holds {len(store)} comparisons."
    except ValueError as e:  # a malformed comparison, or FeedbackStoreError (busy, not SQLite)
        return "error", str(e)


def stored_pairs(db: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The store's preference pairs, and (Streamlit message kind, one line) to show with them:
    an error when the store cannot be read, a warning when malformed rows were left out."""
    try:
        with FeedbackStore(db) as store:
            pairs = store.preference_pairs()
            skipped = store.skipped
    except ValueError as e:  # FeedbackStoreError: the page still renders, saying why
        return [], [("error", str(e))]
    if not skipped:
        return pairs, []
    ids = ", ".join(str(i) for i, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    first = skipped[0][1]
    message = f"{db}: left out {len(skipped)} malformed comparison(s) (ids {ids}; first: {first})."
    return pairs, [("warning", message)]


# --- "Train your own tiny tutor": the pipeline as a job ----------------------------------------

# The pipeline command has no --set: a preset is a small pipeline YAML written outside the
# package (core/configs holds the shipped recipes), next to cut-down held-out files so the final
# evaluation takes seconds, not minutes.
PIPELINE_STAGES = ("base", "sft", "reward", "rlhf")
PIPELINE_CURVES = {
    "base": ("loss", "eval_loss"),
    "sft": ("loss", "eval_loss"),
    "reward": ("loss", "accuracy", "eval_accuracy"),
    "rlhf": ("reward", "kl", "entropy", "clip_fraction"),
}
_STEP_KEYS = {"base": "pretrain", "sft": "sft", "reward": "reward", "rlhf": "rlhf"}
TINY_PRESETS: dict[str, dict] = {
    # About a minute on 2 shared CPU cores: a smaller corpus and a few steps per stage.
    "tiny (about 1 minute)": {
        "pretrain": {
            "num_documents": 1500,
            "eval_documents": 100,
            "max_steps": 30,
            "batch_size": 8,
            "warmup_steps": 5,
            "eval_every": 15,
            "eval_batches": 2,
            "checkpoint_every": 15,
        },
        "sft": {
            "max_steps": 8,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_every": 8,
            "checkpoint_every": 4,
        },
        "reward": {"max_steps": 6, "batch_size": 8, "eval_every": 6, "checkpoint_every": 3},
        "rlhf": {
            "method": "ppo",
            "max_steps": 3,
            "batch_size": 4,
            "minibatches": 2,
            "ppo_epochs": 1,
            "warmup_steps": 1,
            "max_new_tokens": 24,
            "eval_every": 3,
            "checkpoint_every": 1,
            "eval_samples": 1,
        },
    },
    "small (about 2 minutes)": {
        "pretrain": {
            "num_documents": 3000,
            "eval_documents": 200,
            "max_steps": 60,
            "batch_size": 8,
            "warmup_steps": 5,
            "eval_every": 20,
            "eval_batches": 2,
            "checkpoint_every": 20,
        },
        "sft": {
            "max_steps": 16,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_every": 8,
            "checkpoint_every": 8,
        },
        "reward": {"max_steps": 10, "batch_size": 8, "eval_every": 10, "checkpoint_every": 5},
        "rlhf": {
            "method": "ppo",
            "max_steps": 4,
            "batch_size": 4,
            "minibatches": 2,
            "ppo_epochs": 1,
            "warmup_steps": 1,
            "max_new_tokens": 32,
            "eval_every": 4,
            "checkpoint_every": 2,
            "eval_samples": 1,
        },
    },
    # Every stage really runs, on a smaller model (2 layers, 64 wide: 40x fewer weights than the
    # tutor's) on one thread: at this size a second thread costs more in synchronisation than it
    # saves, and on a busy machine two threads made each small matrix product ~100x slower
    # (measured). Pre-training reaches an eval loss near 2.1; the later stages run too few steps
    # to teach it much.
    "micro (about 30 seconds)": {
        "threads": 1,
        "heldout_rows": 4,
        "pretrain": {
            "num_documents": 400,
            "eval_documents": 50,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_steps": 150,
            "batch_size": 8,
            "warmup_steps": 10,
            "eval_every": 50,
            "eval_batches": 2,
            "checkpoint_every": 25,
        },
        "sft": {
            "max_steps": 20,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_every": 10,
            "checkpoint_every": 5,
        },
        "reward": {"max_steps": 10, "batch_size": 8, "eval_every": 10, "checkpoint_every": 5},
        "rlhf": {
            "method": "ppo",
            "max_steps": 4,
            "batch_size": 4,
            "minibatches": 2,
            "ppo_epochs": 1,
            "warmup_steps": 1,
            "max_new_tokens": 24,
            "eval_every": 4,
            "checkpoint_every": 2,
            "eval_samples": 1,
        },
    },
}

HELDOUT_ROWS = 8  # held-out questions / preference pairs / SFT rows a preset's run evaluates on


def _head(source: Path, target: Path, rows: int) -> Path:
    lines = [x for x in source.read_text("utf-8").splitlines() if x.strip()][:rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def write_tiny_config(preset: str, folder: Path) -> Path:
    """Write preset `preset`'s pipeline YAML (and its cut-down held-out files) into `folder`;
    returns the YAML's path. Raises KeyError for an unknown preset."""
    import yaml

    from core.train.stages.pipeline import CONFIG_DIR, PipelineConfig
    from core.train.stages.rlhf import RLHFConfig
    from core.train.stages.sft import SFTConfig

    stages = TINY_PRESETS[preset]
    rows = stages.get("heldout_rows", HELDOUT_ROWS)
    folder.mkdir(parents=True, exist_ok=True)
    slug = preset.split()[0]
    heldout = _head(Path(PipelineConfig.heldout_file), folder / f"{slug}-heldout.jsonl", rows)
    prefs = _head(Path(RLHFConfig.eval_file), folder / f"{slug}-prefs.jsonl", rows)
    # Each stage evaluates before its first step and after its last: on the full held-out
    # files (216 pairs, 108 conversations) that took longer than the stage's own steps.
    sft_eval = _head(Path(SFTConfig.eval_file), folder / f"{slug}-sft-heldout.jsonl", 2 * rows)
    data = {
        "base_model": None,
        "pretrain_config": str(CONFIG_DIR / "tutor-base.yaml"),
        "pretrain": stages["pretrain"],
        "sft": {**stages["sft"], "eval_file": str(sft_eval)},
        "reward": {**stages["reward"], "eval_file": str(prefs)},
        "rlhf": {**stages["rlhf"], "eval_file": str(prefs)},
        "dpo": None,  # the page compares the PPO tutor; DPO would add a stage's time
        "threads": stages.get("threads", 2),
        "eval_samples": 1,
        "heldout_file": str(heldout),
        "sample_prompts": ["What is a token?"],
    }
    path = folder / f"{slug}-pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def pipeline_argv(config: Path) -> list[str]:
    """The command the page runs (as a user would type it); the job adds --output-dir."""
    return ["genai-lab", "pipeline", "--config", str(config), "--quiet"]


def pipeline_progress(out: Path, config: Path | None = None) -> tuple[float, str]:
    """(fraction done, which stage) of a pipeline run in `out`, from its files alone: a stage
    counts as done once its model folder exists, the running one by its metrics' last step."""
    import yaml

    totals: dict[str, int] = {}
    if config is not None and config.is_file():
        data = yaml.safe_load(config.read_text("utf-8")) or {}
        totals = {
            s: int((data.get(section) or {}).get("max_steps", 0))
            for s, section in _STEP_KEYS.items()
        }
    done = 0.0
    for stage in PIPELINE_STAGES:
        if (out / stage / "config.json").is_file():
            done += 1
            continue
        frame = pipeline_metrics(out, stage)
        step = int(frame["step"].max()) if "step" in frame and not frame.empty else 0
        total = totals.get(stage) or 0
        done += min(1.0, step / total) if total else 0.0
        return done / len(PIPELINE_STAGES), stage
    finished = (out / "report.md").is_file()
    return (1.0, "done") if finished else (0.99, "evaluate")


def pipeline_metrics(out: Path, stage: str) -> pd.DataFrame:
    """One stage's metrics.jsonl of a pipeline run (a line still being written is skipped)."""
    return _read_metrics(out / "runs" / stage / "metrics.jsonl")


def _read_metrics(path: Path) -> pd.DataFrame:
    rows = []
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError:
        return pd.DataFrame()
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return pd.DataFrame(rows)


def pipeline_curves(out: Path) -> list[go.Figure]:
    """One titled figure per quantity (each on its own axis) of every stage with metrics."""
    figures = []
    for stage in PIPELINE_STAGES:
        frame = pipeline_metrics(out, stage)
        for key in PIPELINE_CURVES[stage]:
            if key in frame and "step" in frame and frame[key].notna().any():
                figures.append(curve_figure(frame, (key,), f"{stage}: {key}"))
    return figures


# --- the feedback lab's retrain job -------------------------------------------------------------

RETRAIN_EVAL_PAIRS = 48  # held-out pairs the lab's retrain is evaluated on (all 216 took 2/3)


def retrain_argv(
    db: Path, reward_steps: int = 20, policy_steps: int = 10, eval_pairs: int = RETRAIN_EVAL_PAIRS
) -> list[str]:
    """The retrain command (`genai-lab feedback-retrain`); the job adds --output-dir."""
    return [
        "genai-lab", "feedback-retrain", "--db", str(db),
        "--reward-steps", str(reward_steps), "--policy-steps", str(policy_steps),
        "--eval-pairs", str(eval_pairs),
    ]  # fmt: skip


def _flag(argv: list[str], flag: str, default: int) -> int:
    try:
        return int(argv[argv.index(flag) + 1])
    except (ValueError, IndexError):
        return default


def retrain_progress(out: Path, argv: list[str]) -> tuple[float, str]:
    """(fraction done, what runs) of a retrain job, from its files: the reward model's steps,
    the policy's, then the before/after measurement."""
    totals = {
        "reward": _flag(argv, "--reward-steps", 20),
        "policy": _flag(argv, "--policy-steps", 10),
    }
    done = 0.0
    for stage, total in totals.items():
        if (out / stage / "final").is_dir():
            done += 1
            continue
        frame = _read_metrics(out / stage / "metrics.jsonl")
        step = int(frame["step"].max()) if "step" in frame and not frame.empty else 0
        done += min(1.0, step / max(total, 1))
        return done / 3, {"reward": "reward model", "policy": "policy (DPO)"}[stage]
    return (1.0, "done") if (out / "retrain.json").is_file() else (2 / 3, "scoring your answers")


def retrain_summary(out: Path) -> dict | None:
    """A finished retrain's retrain.json, or None while there is none: {"pairs", "reward" and
    "policy" (each stage's numeric figures), "ranked" (each ranked answer's reward before and
    after), "agreement" (pairs the reward model orders like the rankings, before and after),
    "answers" (the policy's greedy answer to each ranked question, before and after)}; the last
    three are empty for a retrain.json written before they were measured."""
    path = out / "retrain.json"
    try:
        reports = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    summary: dict = {"pairs": reports.get("pairs")}
    for stage in ("reward", "policy"):
        report = reports.get(stage) or {}
        summary[stage] = {
            k: v
            for k, v in report.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    measured = reports.get("measured") or {}
    summary["ranked"] = list(measured.get("ranked") or [])
    summary["agreement"] = measured.get("pairs") or {}
    summary["answers"] = list(measured.get("answers") or [])
    return summary


def ranked_rewards_table(rows: list[dict]) -> pd.DataFrame:
    """One line per ranked answer: question, your rank, the answer, its reward before and after
    the retrain and the change (signed, 3 decimals, as text so every renderer shows the same)."""
    return pd.DataFrame(
        [
            {
                "question": r["prompt"],
                "your rank": r["rank"],
                "answer": r["answer"],
                "reward before": f"{r['before']:+.3f}",
                "reward after": f"{r['after']:+.3f}",
                "change": f"{r['after'] - r['before']:+.3f}",
            }
            for r in rows
        ],
        columns=["question", "your rank", "answer", "reward before", "reward after", "change"],
    )


def answer_changes_table(items: list[dict]) -> pd.DataFrame:
    """The tutor's greedy answer to each ranked question before and after the retrain (plain
    text in a table: an answer is never read as markdown)."""
    return pd.DataFrame(
        [
            {
                "question": a["prompt"],
                "before (SFT tutor)": a["before"] or "(nothing)",
                "after (policy trained on your rankings)": a["after"] or "(nothing)",
                "changed": "no" if a["before"] == a["after"] else "yes",
            }
            for a in items
        ],
        columns=[
            "question",
            "before (SFT tutor)",
            "after (policy trained on your rankings)",
            "changed",
        ],
    )
