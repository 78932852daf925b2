"""Prompt emphasis syntax as AUTOMATIC1111's webui and ComfyUI read it: text → (text, weight) runs.

Pure text, no torch: the plan uses it to refuse a prompt the tool could not read before anything
renders; `farm.render.conditioning` turns the runs into SDXL conditioning (and documents how each
tool tokenizes and weights them).

  a1111 (`parse_a1111`, webui's parse_prompt_attention): `(x)` ×1.1, `[x]` ×1/1.1, `(x:w)` ×w;
    nested weights multiply; unclosed brackets still apply to the rest of the prompt; `\\(` `\\)`
    `\\[` `\\]` `\\\\` escape; runs of equal weight merge. `BREAK` (upper case, as a word) marks a
    chunk break.
  comfyui (`parse_comfyui`, ComfyUI's token_weights): only round brackets count; `(x:w)` sets the
    weight to w (an inner explicit weight replaces the outer one, it does not multiply); `(x)`
    ×1.1; unbalanced brackets are literal; only `\\(` and `\\)` escape; `[x]` and `BREAK` are
    literal text.
  plain: the text literally, every weight 1.
"""

from __future__ import annotations

import re
from typing import Any

from farm.errors import PromptError

SYNTAXES = ("a1111", "comfyui", "plain")

_ROUND_UP = 1.1
_SQUARE_DOWN = 1 / 1.1


# --- parsing ------------------------------------------------------------------------------

# One lexical unit of A1111's emphasis syntax per match, tried in this order.
_A1111_UNIT = re.compile(
    r"""
      \\[()\[\]\\]             # an escaped bracket or backslash: that character, literally
    | \\                       # a lone backslash: dropped
    | [(\[]                    # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # ":weight)" closing a round bracket
    | [)\]]                    # closing bracket
    | [^\\()\[\]:]+            # plain text
    | :                        # a colon that closes nothing is text
    """,
    re.VERBOSE,
)
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_a1111(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs as webui's parse_prompt_attention returns them; `("BREAK", -1)` marks
    a chunk break. Example: `a (((house:1.3)) [on]` → `[("a ", 1.0), ("house", 1.573…),
    (" ", 1.1), ("on", 1.0)]` (the first "(" is never closed, so it applies to the rest)."""
    runs: list[list[Any]] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _A1111_UNIT.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):
            runs.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(runs))
        elif unit == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptError(f"prompt weight {weight!r} is not a number: {text!r}") from None
            scale_from(open_round.pop(), factor)
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), _ROUND_UP)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), _SQUARE_DOWN)
        else:
            for i, part in enumerate(_A1111_BREAK.split(unit)):
                if i:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])

    for start in open_round:
        scale_from(start, _ROUND_UP)
    for start in open_square:
        scale_from(start, _SQUARE_DOWN)

    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


_COMFY_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


def _comfy_split_top(text: str) -> list[str]:
    """Top-level pieces: bracketed groups `( … )` (kept with their brackets) and the text between."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _comfy_weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in _comfy_split_top(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * _ROUND_UP
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _comfy_weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def parse_comfyui(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments as ComfyUI's CLIP tokenizer weighs them (escapes resolved). No
    merging: each segment is tokenized on its own. An empty prompt has no segments."""
    for escaped, marker in _COMFY_ESCAPES:
        text = text.replace(escaped, marker)
    result = []
    for segment, weight in _comfy_weights(text, 1.0):
        for escaped, marker in _COMFY_ESCAPES:
            segment = segment.replace(marker, escaped[1])
        result.append((segment, weight))
    return result


def parse(text: str, syntax: str) -> list[tuple[str, float]]:
    """The prompt's (text, weight) runs under `syntax` (plain: the whole text at weight 1)."""
    check_syntax(syntax)
    if syntax == "a1111":
        return parse_a1111(text)
    if syntax == "comfyui":
        return parse_comfyui(text)
    return [(text, 1.0)]


def check_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise PromptError(f"prompt syntax {syntax!r} is not one of {', '.join(SYNTAXES)}")
