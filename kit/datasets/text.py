"""The text form of a dataset row, for a text-LM backbone: the history in words, then the task prompt.

    History (most recent last):
    [1992-09-20, age 0.0] sex: female; race: 2106-3; Birth
    [2019-03-01, age 26.4] visit (WELLNESS): General examination of patient; Body Height (bin 7 of 10); ...
    Question: Will this patient die within one year?

Code descriptions come from the event store's codes table; a value-bin token reads "(bin k of n)".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kit.tokenizer import CLS, TOKEN_TYPES, VE, VS, Tokenizer

_STATIC_PREFIXES = {"GENDER/": "sex", "RACE/": "race", "ETHNICITY/": "ethnicity"}


def _words(token: str, tokenizer: Tokenizer, descriptions: dict[str, str]) -> str:
    if "#Q" in token:
        code, q = token.rsplit("#Q", 1)
        n = len(tokenizer.value_bins.get(code, [])) + 1
        return f"{descriptions.get(code) or code} (bin {q} of {n})"
    if "=" in token:
        code, value = token.split("=", 1)
        return f"{descriptions.get(code) or code}: {descriptions.get(value) or value}"
    for prefix, name in _STATIC_PREFIXES.items():
        if token.startswith(prefix):
            return f"{name}: {descriptions.get(token) or token[len(prefix):]}"
    if token.startswith("ENCOUNTER/") and token.endswith("/START"):
        return f"visit ({token.split('/')[1]})"
    return descriptions.get(token) or token


def history_text(
    input_ids: Sequence[int],
    token_time: Sequence[datetime],
    token_age: Sequence[float],
    token_type: Sequence[int],
    prompt: str,
    tokenizer: Tokenizer,
    descriptions: dict[str, str],
) -> str:
    """One line per visit (and one for what lies outside visits), oldest first, then the question."""
    lines: list[str] = []
    current: list[str] = []
    stamp = ""

    def flush() -> None:
        if current:
            lines.append(f"[{stamp}] " + "; ".join(current))
            current.clear()

    for tid, t, age, ttype in zip(input_ids, token_time, token_age, token_type):
        token = tokenizer.vocab[tid] if 0 <= tid < tokenizer.vocab_size else "[UNK]"
        if token in (CLS, VE) or ttype == TOKEN_TYPES["interval"]:
            if token == VE:
                flush()
            continue
        if token == VS:
            flush()
            stamp = f"{t:%Y-%m-%d}, age {age:.1f}"
            continue
        if not current and not stamp:
            stamp = f"{t:%Y-%m-%d}, age {max(age, 0.0):.1f}"
        current.append("unknown code" if token == "[UNK]" else _words(token, tokenizer, descriptions))
    flush()
    return "History (most recent last):\n" + "\n".join(lines) + f"\nQuestion: {prompt}"
