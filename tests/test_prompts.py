"""Prompt emphasis and chunking per A1111 / ComfyUI, and encoding through the tiny SDXL's two encoders."""

from __future__ import annotations

import pytest
import torch

from farm.errors import PromptError
from farm.render.conditioning import CHUNK_LENGTH, encode, encode_pair, repeat_to_common_length, tokenize
from farm.sweep.prompt_syntax import SYNTAXES, parse, parse_a1111, parse_comfyui


# --- A1111: the examples of webui's parse_prompt_attention and its documented rules ---------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("(ohwx man:1.1), photo", [("ohwx man", 1.1), (", photo", 1.0)]),
    ("[word]", [("word", 0.9090909090909091)]),
    ("[[word]]", [("word", 0.8264462809917354)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("((word:1.5))", [("word", 1.6500000000000001)]),  # nested weights multiply
    ("[a (b) c]", [("a ", 0.9090909090909091), ("b", 1.0), (" c", 0.9090909090909091)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a, BREAK\nb", [("a,", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAKFAST break", [("BREAKFAST break", 1.0)]),
    # inside brackets the marker is scaled like any run, so it is no longer a chunk break
    ("((a BREAK b))", [("a", 1.2100000000000002), ("BREAK", -1.2100000000000002), ("b", 1.2100000000000002)]),
    ("\\\\ and \\[x\\)", [("\\ and [x)", 1.0)]),
    ("word:1.2)", [("word:1.2)", 1.0)]),  # nothing to close: text
    ("a: b", [("a: b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_a1111(text, expected):
    assert parse_a1111(text) == expected


def test_parse_a1111_rejects_a_weight_webui_cannot_read():
    with pytest.raises(PromptError):
        parse_a1111("(word:1.2.3)")


# --- ComfyUI: token_weights semantics ------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(ohwx man:1.1), photo", [("ohwx man", 1.1), (", photo", 1.0)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("((word:1.5))", [("word", 1.5)]),  # an explicit weight replaces the outer one
    ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.5), (" c", 1.1)]),
    ("[word]", [("[word]", 1.0)]),  # square brackets are text
    ("a BREAK b", [("a BREAK b", 1.0)]),  # BREAK is text
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("\\[x\\]", [("\\[x\\]", 1.0)]),  # only round brackets escape
    ("(unbalanced", [("(unbalanced", 1.0)]),
    ("x) (y)", [("x) (y)", 1.0)]),  # a stray ")" leaves the rest unparsed
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon stays, the group is ×1.1
    ("(:1.5)", [(":1.5", 1.1)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("", []),
])
def test_parse_comfyui(text, expected):
    assert parse_comfyui(text) == expected


def test_parse_plain():
    assert parse("(x:1.3) [y] BREAK z", "plain") == [("(x:1.3) [y] BREAK z", 1.0)]
    with pytest.raises(PromptError):
        parse("x", "invokeai")


# --- chunking (tokenizers only) --------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_model):
    import diffusers

    return diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _content(chunk, tokenizer):
    """A chunk's prompt tokens (between the start token and the first end token)."""
    end = chunk.tokens.index(tokenizer.eos_token_id)
    return chunk.tokens[1:end]


def test_chunks_are_framed_and_padded_per_encoder(pipe):
    for tokenizer, pad in ((pipe.tokenizer, pipe.tokenizer.eos_token_id), (pipe.tokenizer_2, 0)):
        for syntax in SYNTAXES:
            (chunk,) = tokenize(tokenizer, "photo of a man", syntax)
            ids = _ids(tokenizer, "photo of a man")
            assert len(chunk.tokens) == len(chunk.weights) == CHUNK_LENGTH
            assert chunk.tokens == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * (75 - len(ids))
    assert pipe.tokenizer_2.convert_ids_to_tokens(0) == "!"


def test_a1111_break_and_comma_backtracking(pipe):
    tok = pipe.tokenizer
    first, second = tokenize(tok, "a photo BREAK of a man", "a1111")
    assert _content(first, tok) == _ids(tok, "a photo") and _content(second, tok) == _ids(tok, "of a man")
    assert len(tokenize(tok, "a photo BREAK of a man", "comfyui")) == 1

    # a full chunk hands the words after its last comma (5 tokens back) to the next chunk
    text = "photo " * 70 + ", a b c d e f g h"
    first, second = tokenize(tok, text, "a1111")
    assert _content(first, tok) == _ids(tok, "photo " * 70 + ",")
    assert _content(second, tok) == _ids(tok, "a b c d e f g h")
    first, second = tokenize(tok, text, "plain")  # plain cuts at 75 tokens
    assert len(_content(first, tok)) == 75 and _content(second, tok) == _ids(tok, "e f g h")


def test_comfyui_moves_short_weighted_groups_whole(pipe):
    tok = pipe.tokenizer
    first, second = tokenize(tok, "photo " * 73 + "(a red man:1.2)", "comfyui")
    assert _content(first, tok) == _ids(tok, "photo " * 73)
    assert _content(second, tok) == _ids(tok, "a red man")
    assert second.weights[1:4] == [1.2] * 3 and second.weights[4:] == [1.0] * 73
    first, second = tokenize(tok, "photo " * 100, "comfyui")  # 8+ tokens: split at 75
    assert len(_content(first, tok)) == 75 and len(_content(second, tok)) == 25


# --- encoding through the tiny model's encoders ----------------------------------------------

@pytest.mark.parametrize("syntax, text", [(s, "photo of a man") for s in SYNTAXES]
                         + [("plain", "(photo of a man:1.3)")])  # plain keeps the emphasis literal
def test_unweighted_single_chunk_matches_diffusers(pipe, syntax, text):
    cond = encode(pipe, text, syntax, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    assert cond.embeds.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)


@pytest.mark.parametrize("syntax", ["a1111", "comfyui"])
def test_weights(pipe, syntax):
    base = encode(pipe, "photo of a man", syntax, "cpu")
    same = encode(pipe, "(photo of a man:1.0)", syntax, "cpu")
    assert torch.equal(same.embeds, base.embeds) and torch.equal(same.pooled, base.pooled)

    weighted = encode(pipe, "(photo of a man:1.3)", syntax, "cpu")
    assert weighted.embeds.shape == base.embeds.shape
    assert not torch.allclose(weighted.embeds, base.embeds)
    assert torch.equal(weighted.pooled, base.pooled)  # neither tool weights the pooled output

    w = torch.ones(77, 1)
    w[1:5] = 1.3  # "photo of a man" is 4 tokens after the start token
    expected = []
    for part in base.embeds.split(32, dim=-1):  # each encoder on its own
        z = part[0]
        if syntax == "a1111":  # multiply, then restore the chunk's mean
            scaled = z * w
            expected.append(scaled * (z.mean() / scaled.mean()))
        else:  # interpolate from the empty prompt's encoding
            empty = encode(pipe, "", "comfyui", "cpu").embeds[0]
            e = empty[:, :32] if not expected else empty[:, 32:]
            expected.append(torch.where(w != 1, (z - e) * w + e, z))
    assert torch.allclose(weighted.embeds[0], torch.cat(expected, dim=-1), atol=1e-6)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_long_prompts_are_not_truncated(pipe, syntax):
    a = encode(pipe, "photo " * 85 + "red", syntax, "cpu")
    b = encode(pipe, "photo " * 85 + "blue", syntax, "cpu")
    assert a.chunks == b.chunks == 2 and a.embeds.shape == (1, 154, 64)
    assert torch.equal(a.embeds[:, :77], b.embeds[:, :77]) and torch.equal(a.pooled, b.pooled)
    assert not torch.allclose(a.embeds[:, 77:], b.embeds[:, 77:])


def test_break_starts_a_chunk(pipe):
    split = encode(pipe, "a photo BREAK of a man", "a1111", "cpu")
    assert split.chunks == 2
    assert torch.equal(split.embeds[:, :77], encode(pipe, "a photo", "a1111", "cpu").embeds)
    assert torch.equal(split.embeds[:, 77:], encode(pipe, "of a man", "a1111", "cpu").embeds)
    assert encode(pipe, "a photo BREAK of a man", "comfyui", "cpu").chunks == 1


def test_pairs(pipe):
    long = "photo " * 85 + "red"
    empty = encode(pipe, "", "a1111", "cpu")

    cond, uncond = encode_pair(pipe, long, "blurry", "a1111", "cpu")  # webui's default: no padding
    assert cond.embeds.shape[1] == 154 and uncond.embeds.shape[1] == 77
    cond, uncond = encode_pair(pipe, long, "", "a1111", "cpu")  # an empty negative is zeros
    assert uncond.embeds.shape == (1, 77, 64) and not uncond.embeds.any() and not uncond.pooled.any()

    cond, uncond = encode_pair(pipe, long, "blurry", "a1111", "cpu", a1111_pad="empty")
    blurry = encode(pipe, "blurry", "a1111", "cpu")
    assert cond.embeds.shape == uncond.embeds.shape == (1, 154, 64)
    assert torch.equal(uncond.embeds[:, :77], blurry.embeds) and torch.equal(uncond.embeds[:, 77:], empty.embeds)
    cond, uncond = encode_pair(pipe, "blurry", long, "a1111", "cpu", a1111_pad="empty")  # the prompt is padded
    assert torch.equal(cond.embeds[:, 77:], empty.embeds) and uncond.embeds.shape[1] == 154

    cond, uncond = encode_pair(pipe, long, "blurry", "a1111", "cpu", a1111_pad="v0")
    assert uncond.embeds.shape == (1, 154, 64)
    assert torch.equal(uncond.embeds[:, 77:], blurry.embeds[:, -1:].repeat(1, 77, 1))
    cond, uncond = encode_pair(pipe, "blurry", long, "a1111", "cpu", a1111_pad="v0")  # v0 truncates
    assert uncond.embeds.shape == (1, 77, 64)

    for syntax in ("comfyui", "plain"):
        cond, uncond = encode_pair(pipe, long, "", syntax, "cpu")
        assert cond.embeds.shape[1] == 154 and uncond.embeds.shape[1] == 77
        assert torch.equal(uncond.embeds, encode(pipe, "", syntax, "cpu").embeds) and uncond.pooled.any()
    with pytest.raises(PromptError):
        encode_pair(pipe, "a", "b", "a1111", "cpu", a1111_pad="last")


def test_repeating_keys_leaves_cross_attention_unchanged():
    torch.manual_seed(0)
    query = torch.randn(1, 2, 5, 8)
    long, short = torch.randn(1, 154, 8), torch.randn(1, 77, 8)
    a, b = repeat_to_common_length(long, short)
    assert a.shape == b.shape == (1, 154, 8) and torch.equal(b[:, 77:], short)
    keys = short.unsqueeze(1).expand(1, 2, 77, 8)
    repeated = b.unsqueeze(1).expand(1, 2, 154, 8)
    attend = torch.nn.functional.scaled_dot_product_attention
    assert torch.allclose(attend(query, keys, keys), attend(query, repeated, repeated), atol=1e-6)
