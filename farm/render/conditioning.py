"""Prompt encoding for SDXL that reads emphasis the way AUTOMATIC1111's webui or ComfyUI does.

diffusers' `encode_prompt` feeds `(ohwx man:1.1)` to CLIP as literal characters and cuts a prompt
at 75 tokens. Here a prompt is parsed per tool, split into 75-token chunks (each framed as
`start, tokens…, end, pad…` = 77 tokens), every chunk goes through both text encoders, and the
token weights are applied to the hidden states the way the tool applies them.

What both tools do for SDXL (and this module does):
  - hidden states: the penultimate layer of each encoder, without the final layer norm; the
    first encoder's (CLIP ViT-L) and the second's (OpenCLIP bigG) are concatenated per token;
    chunks are concatenated along the token axis: (1, 77·chunks, C_l + C_g).
  - pooled: the second encoder's projected output of the *first* chunk, never weighted.
  - padding: the first encoder's chunks are padded with its end token, the second's with token 0
    ("!") after the end token. diffusers' `tokenizer` / `tokenizer_2` pad the same way.

Where they differ:

  a1111 (`parse_a1111`, webui's parse_prompt_attention): `(x)` ×1.1, `[x]` ×1/1.1, `(x:w)` ×w;
    nested weights multiply; unclosed brackets still apply to the rest of the prompt; `\\(` `\\)`
    `\\[` `\\]` `\\\\` escape; runs of equal weight merge. `BREAK` (upper case, as a word) starts
    a new chunk. A chunk that fills up moves the text after its last comma to the next chunk when
    that comma is within 20 tokens of the end. Weights: z·w per token, then the chunk is rescaled
    so its mean over all values equals the unweighted mean ("Original" emphasis), per encoder.
  comfyui (`parse_comfyui`, ComfyUI's token_weights): only round brackets count; `(x:w)` sets the
    weight to w (an inner explicit weight replaces the outer one, it does not multiply); `(x)`
    ×1.1; unbalanced brackets are literal; only `\\(` and `\\)` escape; `[x]` and `BREAK` are
    literal text. A weighted segment is tokenized as a whole; a piece of fewer than 8 tokens that
    does not fit in the current chunk moves whole to the next one, a longer one is split. Weights:
    z' = (z − z_empty)·w + z_empty per weighted token, z_empty being the encoding of the empty
    prompt at the same position; no mean restore.
  plain: the text literally, every weight 1, cut into consecutive 75-token chunks (no truncation).

Prompt editing (`[a:b:0.5]`), alternation (`[a|b]`), `AND` and textual-inversion embeddings are
not emphasis and are not interpreted here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from farm.errors import PromptError
from farm.sweep.prompt_syntax import parse

CHUNK_TOKENS = 75  # prompt tokens per chunk; the chunk adds a start and an end token
CHUNK_LENGTH = CHUNK_TOKENS + 2
A1111_COMMA_BACKTRACK = 20  # webui's default "Prompt word wrap length limit"
COMFY_LARGE_GROUP = 8  # ComfyUI splits a piece of this many tokens or more across chunks
SECOND_ENCODER_PAD = 0  # both tools pad the OpenCLIP bigG chunks with token 0 ("!")

A1111_PAD_MODES = (None, "empty", "v0")


# --- tokenization into chunks ---------------------------------------------------------------

@dataclass
class Chunk:
    """One encoder input: 77 token ids (start, up to 75 prompt tokens, end, padding) and the
    weight of each position (1.0 for start, end and padding)."""

    tokens: list[int]
    weights: list[float]


def _ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def _frame(tokenizer, content: list[int], weights: list[float], pad_id: int) -> Chunk:
    room = CHUNK_TOKENS - len(content)
    return Chunk(
        tokens=[tokenizer.bos_token_id, *content, tokenizer.eos_token_id] + [pad_id] * room,
        weights=[1.0, *weights, 1.0] + [1.0] * room,
    )


def _a1111_content(tokenizer, runs: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """webui's chunking: BREAK closes the chunk; a full chunk hands the tokens after its last comma
    (if that comma is at most A1111_COMMA_BACKTRACK tokens back) to the next chunk."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # not get_vocab(): it copies 49k entries (40 ms)
    done: list[tuple[list[int], list[float]]] = []
    state = {"tokens": [], "weights": [], "comma": -1}

    def close(tokens: list[int], weights: list[float]) -> None:
        done.append((tokens, weights))
        state["tokens"], state["weights"], state["comma"] = [], [], -1

    for text, weight in runs:
        if text == "BREAK" and weight == -1:
            close(state["tokens"], state["weights"])
            continue
        for token in _ids(tokenizer, text):
            tokens, weights = state["tokens"], state["weights"]
            if token == comma:
                state["comma"] = len(tokens)
            elif (len(tokens) == CHUNK_TOKENS and state["comma"] != -1
                  and len(tokens) - state["comma"] <= A1111_COMMA_BACKTRACK):
                cut = state["comma"] + 1
                close(tokens[:cut], weights[:cut])
                state["tokens"], state["weights"] = tokens[cut:], weights[cut:]
            if len(state["tokens"]) == CHUNK_TOKENS:
                close(state["tokens"], state["weights"])
            state["tokens"].append(token)
            state["weights"].append(weight)
    if state["tokens"] or not done:
        close(state["tokens"], state["weights"])
    return done


_COMFY_EMBEDDING_SPLIT = re.compile(" embedding:|\nembedding:")


def _comfyui_content(tokenizer, runs: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """ComfyUI's chunking: each weighted segment (cut before any "embedding:" word) is one group;
    a group that does not fit moves whole to the next chunk unless it has 8+ tokens, then it is split."""
    groups: list[list[tuple[int, float]]] = []
    for segment, weight in runs:
        pieces = _COMFY_EMBEDDING_SPLIT.split(segment)
        pieces = pieces[:1] + ["embedding:" + p for p in pieces[1:]]
        groups += [[(t, weight) for t in _ids(tokenizer, p)] for p in pieces if p]

    done: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for group in groups:
        large = len(group) >= COMFY_LARGE_GROUP
        while group:
            if len(current) + len(group) > CHUNK_TOKENS:
                if large:
                    room = CHUNK_TOKENS - len(current)
                    current, group = current + group[:room], group[room:]
                done.append(current)
                current = []
            else:
                current, group = current + group, []
    done.append(current)
    return [([t for t, _ in c], [w for _, w in c]) for c in done]


def _plain_content(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    ids = _ids(tokenizer, text)
    starts = range(0, max(len(ids), 1), CHUNK_TOKENS)
    return [(ids[s:s + CHUNK_TOKENS], [1.0] * len(ids[s:s + CHUNK_TOKENS])) for s in starts]


def _chunks(tokenizer, text: str, runs: list[tuple[str, float]], syntax: str, pad_id: int) -> list[Chunk]:
    if syntax == "a1111":
        content = _a1111_content(tokenizer, runs)
    elif syntax == "comfyui":
        content = _comfyui_content(tokenizer, runs)
    else:
        content = _plain_content(tokenizer, text)
    return [_frame(tokenizer, tokens, weights, pad_id) for tokens, weights in content]


def tokenize(tokenizer, text: str, syntax: str, pad_id: Optional[int] = None) -> list[Chunk]:
    """The prompt as 77-token chunks for one CLIP tokenizer, chunked and weighted per `syntax`.
    `pad_id` defaults to the tokenizer's pad token (diffusers' SDXL tokenizers pad as the tools do)."""
    runs = parse(text, syntax)
    return _chunks(tokenizer, text, runs, syntax, tokenizer.pad_token_id if pad_id is None else pad_id)


# --- encoding -------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """A prompt's SDXL conditioning: `embeds` (1, 77·chunks, C_l + C_g; 2048 for SDXL) for the
    UNet's cross-attention and `pooled` (1, P; 1280 for SDXL) for its added text embedding."""

    embeds: Any
    pooled: Any

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // CHUNK_LENGTH


def _encoders(pipe) -> list[tuple[str, Any, Any, int]]:
    """(name, tokenizer, text encoder, pad id) of the pipeline's encoders, ViT-L first."""
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
        raise PromptError("prompt encoding needs an SDXL pipeline (text_encoder_2 is missing)")
    found = []
    if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        found.append(("l", pipe.tokenizer, pipe.text_encoder, pipe.tokenizer.eos_token_id))
    found.append(("g", pipe.tokenizer_2, pipe.text_encoder_2, SECOND_ENCODER_PAD))
    return found


def _run_encoder(encoder, rows: list[list[int]], device):
    """Penultimate hidden states (no final layer norm) in float32, and the projected pooled
    output (taken at the end token) when the encoder has a projection."""
    import torch

    hidden, projected = [], []
    for row in rows:  # one chunk per call, so a chunk's encoding never depends on its neighbours
        out = encoder(torch.tensor([row], dtype=torch.long, device=device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float())
        if getattr(out, "text_embeds", None) is not None:
            projected.append(out.text_embeds.float())
    return torch.cat(hidden), (torch.cat(projected) if projected else None)


def _encode_chunks(tokenizer, encoder, chunks: list[Chunk], syntax: str, pad_id: int, device):
    """(1, 77·chunks, C) weighted per the tool, and the first chunk's projected pooled output."""
    import torch

    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=device)
    weighted = bool((weights != 1.0).any())
    rows = [c.tokens for c in chunks]
    if syntax == "comfyui" and weighted:
        rows.append(_frame(tokenizer, [], [], pad_id).tokens)  # z_empty: the empty prompt
    hidden, projected = _run_encoder(encoder, rows, device)
    pooled = None if projected is None else projected[0:1]

    if syntax == "comfyui" and weighted:
        hidden, empty = hidden[:-1], hidden[-1:]
        w = weights.unsqueeze(-1)
        hidden = torch.where(w != 1.0, (hidden - empty) * w + empty, hidden)
    elif syntax == "a1111" and weighted:
        rescaled = []
        for z, w in zip(hidden, weights):
            if bool((w != 1.0).any()):
                before = z.mean()
                z = z * w.unsqueeze(-1)
                z = z * (before / z.mean())
            rescaled.append(z)
        hidden = torch.stack(rescaled)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def _default_device(pipe):
    return getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None) or "cpu"


def encode(pipe, text: str, syntax: str = "a1111", device=None) -> Conditioning:
    """One prompt through both SDXL text encoders with `syntax`'s emphasis and chunking; tensors
    in the second text encoder's dtype on `device` (default: the pipeline's execution device)."""
    import torch

    runs = parse(text, syntax)
    device = torch.device(device if device is not None else _default_device(pipe))
    parts, pooled = [], None
    with torch.no_grad():
        for name, tokenizer, encoder, pad_id in _encoders(pipe):
            chunks = _chunks(tokenizer, text, runs, syntax, pad_id)
            hidden, projected = _encode_chunks(tokenizer, encoder, chunks, syntax, pad_id, device)
            parts.append(hidden)
            if name == "g":
                pooled = projected
    length = min(p.shape[1] for p in parts)  # the encoders share CLIP's vocabulary: equal in practice
    embeds = torch.cat([p[:, :length] for p in parts], dim=-1)
    dtype = pipe.text_encoder_2.dtype
    return Conditioning(embeds=embeds.to(dtype), pooled=pooled.to(dtype))


def encode_pair(pipe, positive: str, negative: str, syntax: str = "a1111", device=None, *,
                a1111_pad: Optional[str] = None) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) for classifier-free guidance, as the tool builds them.

    a1111: an empty negative prompt ("" exactly) is all zeros, embeds and pooled (webui zeroes
    the text conditioning of an empty SDXL negative). Lengths: with webui's default settings a
    prompt and negative of different chunk counts stay unequal and the UNet runs them apart
    (`a1111_pad=None`). `a1111_pad="empty"` reproduces its "Pad prompt/negative prompt" setting
    (infotext "Pad conds"): the shorter one gets the empty prompt's encoding appended until the
    lengths match. `a1111_pad="v0"` reproduces "Pad prompt/negative prompt (v0)": the negative
    alone is made the prompt's length, by repeating its last token vector or by truncating it.

    comfyui and plain: both are encoded as they are (an empty negative is the encoded empty
    prompt) and may differ in length. ComfyUI batches them by repeating each to the least common
    multiple of the lengths; computing them apart is the same result, because cross-attention
    over keys/values repeated k times gives each original key k copies of 1/k of its softmax
    weight, i.e. the same weighted mean of the values (see `repeat_to_common_length`).
    """
    import torch

    if a1111_pad not in A1111_PAD_MODES:
        raise PromptError(f"a1111_pad {a1111_pad!r} is not one of None, 'empty', 'v0'")
    cond = encode(pipe, positive, syntax, device)
    if syntax == "a1111" and negative == "":
        embeds = cond.embeds
        uncond = Conditioning(
            embeds=torch.zeros((1, CHUNK_LENGTH, embeds.shape[-1]), dtype=embeds.dtype, device=embeds.device),
            pooled=torch.zeros_like(cond.pooled),
        )
    else:
        uncond = encode(pipe, negative, syntax, device)

    if syntax != "a1111" or a1111_pad is None or cond.embeds.shape[1] == uncond.embeds.shape[1]:
        return cond, uncond
    if a1111_pad == "empty":
        empty = encode(pipe, "", "a1111", device).embeds

        def padded(c: Conditioning, length: int) -> Conditioning:
            repeats = (length - c.embeds.shape[1]) // empty.shape[1]
            return Conditioning(torch.cat([c.embeds, empty.repeat(1, repeats, 1)], dim=1), c.pooled)

        if cond.embeds.shape[1] < uncond.embeds.shape[1]:
            return padded(cond, uncond.embeds.shape[1]), uncond
        return cond, padded(uncond, cond.embeds.shape[1])
    length = cond.embeds.shape[1]
    embeds = uncond.embeds
    if embeds.shape[1] < length:
        embeds = torch.cat([embeds, embeds[:, -1:].repeat(1, length - embeds.shape[1], 1)], dim=1)
    return cond, Conditioning(embeds[:, :length], uncond.pooled)


def repeat_to_common_length(*embeds):
    """The embeds repeated along the token axis to the least common multiple of their lengths
    (ComfyUI's batching of unequal conds); cross-attention output is unchanged by the repeat."""
    length = math.lcm(*(e.shape[1] for e in embeds))
    return tuple(e if e.shape[1] == length else e.repeat(1, length // e.shape[1], 1) for e in embeds)
