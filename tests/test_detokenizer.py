"""Incremental detokenizer vs. ``tokenizer.decode`` of the real default-model tokenizer."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from kvasir.engine.detokenizer import IncrementalDetokenizer
from kvasir.models.default import default_model_path
from kvasir.sampling_params import SamplingParams

PROMPT = "Hello there, how are you?"
MULTILINGUAL = "Emoji 😀🎉👩‍👩‍👧 naïve café, 日本語のテキスト, 你好世界, Ελληνικά, ✓ done."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def feed(
    det: IncrementalDetokenizer,
    ids: list[int],
    rng: random.Random | None = None,
    stop_terminated: bool = False,
    delta: bool = False,
) -> tuple[str | None, list[str]]:
    """Feed ``ids`` in chunks of 1-3 tokens; return the matched stop string and the text
    reported after every chunk (cumulative, or the delta pieces)."""
    rng = rng or random.Random(0)
    reported: list[str] = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 3)
        chunk = ids[i : i + k]
        i += k
        last = i >= len(ids)
        stop = det.update(chunk, stop_terminated and last)
        finished = last or stop is not None
        reported.append(det.get_next_output_text(finished, delta))
        if stop is not None:
            return stop, reported
    return None, reported


def expected_text(tokenizer: Any, ids: list[int], skip: bool) -> str:
    # An incomplete UTF-8 sequence at the very end is never emitted.
    return tokenizer.decode(ids, skip_special_tokens=skip).rstrip("\ufffd")


def test_random_sequences_match_full_decode(tokenizer: Any) -> None:
    rng = random.Random(1234)
    prompt = tokenizer.encode(PROMPT)
    vocab_size = len(tokenizer)
    for _ in range(300):
        skip = rng.random() < 0.5
        n = rng.randint(1, 40)
        # Mostly random vocabulary ids (many are pieces of multi-byte characters), some
        # special / added tokens (ids 0-16).
        ids = [
            rng.randrange(vocab_size) if rng.random() < 0.9 else rng.randrange(17) for _ in range(n)
        ]
        det = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=skip))
        _, reported = feed(det, ids, rng)
        assert det.output_text == expected_text(tokenizer, ids, skip)
        assert det.token_ids == ids
        # Reported text only ever grows, never takes back a character.
        for a, b in zip(reported, reported[1:], strict=False):
            assert b.startswith(a)


def test_multibyte_characters_split_across_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode(MULTILINGUAL)
    # The byte-level BPE really splits some characters over several tokens.
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)
    det = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), SamplingParams())
    for t in ids:
        det.update([t], False)
        text = det.get_next_output_text(False, False)
        assert "\ufffd" not in text  # never a broken character, even mid-way
        assert MULTILINGUAL.startswith(text)
    assert det.output_text == MULTILINGUAL


def test_skip_special_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("a<|im_start|>b<|im_end|> c<|endoftext|>d")
    for skip, text in [(True, "ab cd"), (False, "a<|im_start|>b<|im_end|> c<|endoftext|>d")]:
        det = IncrementalDetokenizer(tokenizer, [1], SamplingParams(skip_special_tokens=skip))
        feed(det, ids)
        assert det.output_text == text


def test_slow_tokenizer_spaces_between_special_tokens(tokenizer: Any) -> None:
    class SlowTokenizer:
        """A tokenizer without a Rust backend: the per-token-string path."""

        def convert_ids_to_tokens(
            self, ids: list[int], skip_special_tokens: bool = False
        ) -> list[str]:
            return tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return tokenizer.convert_tokens_to_string(tokens)

        def get_added_vocab(self) -> dict[str, int]:
            return tokenizer.get_added_vocab()

    ids = tokenizer.encode("a<|im_start|>b c<|im_end|>")
    cases = [
        (dict(spaces_between_special_tokens=True), "a <|im_start|> b c <|im_end|>"),
        (dict(spaces_between_special_tokens=False), "a<|im_start|>b c<|im_end|>"),
        (dict(skip_special_tokens=True), "ab c"),
    ]
    for kwargs, text in cases:
        params = SamplingParams(
            skip_special_tokens=kwargs.pop("skip_special_tokens", False), **kwargs
        )
        det = IncrementalDetokenizer(SlowTokenizer(), [], params)
        for t in ids:
            det.update([t], False)
        assert det.output_text == text


def test_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "Hello world, the answer is 42. END of story"
    ids = tokenizer.encode(text)
    # "answer is" covers two tokens; "swer i" starts and ends inside tokens.
    for stop, kept in [("answer is", "Hello world, the "), ("swer i", "Hello world, the an")]:
        for include in (False, True):
            params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
            det = IncrementalDetokenizer(tokenizer, [], params)
            matched, reported = feed(det, ids)
            final = kept + stop if include else kept
            assert matched == stop
            assert det.output_text == final
            assert reported[-1] == final
            # A partial stop string never leaks: everything reported is a prefix of the end.
            assert all(final.startswith(r) for r in reported)


def test_earliest_stop_string_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four")
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["four", "two", "three"]))
    matched = None
    for t in ids:
        matched = matched or det.update([t], False)
    assert matched == "two"
    assert det.output_text == "one "


def test_stop_string_not_matched_in_prompt_or_before_min_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode(" stop here and stop again")
    params = SamplingParams(stop=["stop"], min_tokens=3, max_tokens=10)
    det = IncrementalDetokenizer(tokenizer, tokenizer.encode("please stop"), params)
    matched = None
    for t in ids:
        matched = det.update([t], False)
        if matched:
            break
    assert matched == "stop"
    # The first "stop" was within min_tokens; the second one ends the text.
    assert det.output_text == " stop here and "


def test_delta_concatenation_equals_full_text(tokenizer: Any) -> None:
    ids = tokenizer.encode(MULTILINGUAL + " The end.")
    for stop in ([], ["Ελλην"], ["end", "日本"]):
        full = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
        delta = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
        feed(full, ids, random.Random(3))
        _, pieces = feed(delta, ids, random.Random(3), delta=True)
        assert "".join(pieces) == full.output_text == delta.output_text


def test_stop_token_contributes_no_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("Sure thing.") + [2]  # <|im_end|>
    for include, text in [(False, "Sure thing."), (True, "Sure thing.<|im_end|>")]:
        params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        det = IncrementalDetokenizer(tokenizer, [], params)
        assert det.update(ids, stop_terminated=True) is None
        assert det.output_text == text
        assert det.token_ids == ids  # the stop token is still an output token


def test_no_tokenizer_tracks_ids_only() -> None:
    det = IncrementalDetokenizer(None, [1, 2, 3], SamplingParams(stop=["x"]))
    assert det.update([5, 6], False) is None
    assert det.update([7], True) is None
    assert det.token_ids == [5, 6, 7]
    assert det.output_text == ""
    assert det.get_next_output_text(True, True) == ""
