"""Incremental detokenization and stop-string matching for one sequence.

Runs on the client side (API server / offline engine), never in the engine core.
The text of each new token is found with vLLM's prefix_offset / read_offset algorithm:
decode a short window of ids ending at the new token and take what it adds to the
window without that token. Decoding in context is what gives SentencePiece tokens their
leading space and joins multi-byte characters split over several byte tokens; a window
whose text ends in U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvasir.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output token (vLLM uses 5).
_INITIAL_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


def make_decode_fn(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    """A function that decodes a list of ids exactly as ``tokenizer.decode`` does (no
    clean-up of tokenization spaces), as cheaply as the tokenizer allows.

    Fast (Rust ``tokenizers``) tokenizers ignore ``spaces_between_special_tokens``, as
    they do in HF and vLLM; the slow path joins added tokens with spaces like vLLM's.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:

        def decode_fast(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode_fast

    added_vocab = (
        set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    )
    if not added_vocab:

        def decode_plain(ids: list[int]) -> str:
            tokens = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
            return tokenizer.convert_tokens_to_string(tokens)

        return decode_plain
    separator = " " if spaces_between_special_tokens else ""

    def decode_slow(ids: list[int]) -> str:
        # Added tokens bypass the model's token -> text conversion (vLLM's slow path).
        tokens = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in added_vocab:
                if current:
                    sub_texts.append(tokenizer.convert_tokens_to_string(current))
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(tokenizer.convert_tokens_to_string(current))
        return separator.join(sub_texts)

    return decode_slow


class IncrementalDetokenizer:
    """Output text of one sequence, grown token by token, with stop-string checks.

    ``token_ids`` holds every output token (including a final EOS / stop token id);
    ``output_text`` holds the text decoded so far, truncated at a matched stop string.
    With ``tokenizer is None`` only token ids are tracked and the text stays empty.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.output_text = ""
        self.token_ids: list[int] = []
        self._tokenizer = tokenizer
        self._min_tokens = params.min_tokens
        self._include_stop_str = params.include_stop_str_in_output
        self._stop: list[str] = list(params.stop or []) if tokenizer is not None else []
        # Longest partial stop string that may still complete: never released early.
        self._stop_buffer_length = (
            max(len(s) for s in self._stop) - 1 if self._stop and not self._include_stop_str else 0
        )
        self._last_output_text_offset = 0
        if tokenizer is None:
            return
        self._decode = make_decode_fn(
            tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        # Decoding window: ids[prefix_offset:read_offset] were already turned into text.
        self._ids = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append ``new_token_ids``; return the stop string that matched, if any.

        ``stop_terminated``: the last id is the EOS / stop token that ended the sequence;
        like vLLM, its text is left out unless ``include_stop_str_in_output``.
        """
        if not new_token_ids:
            return None
        if self._tokenizer is None:
            self.token_ids.extend(new_token_ids)
            return None
        skipped_stop_token = None
        if stop_terminated and not self._include_stop_str:
            skipped_stop_token = new_token_ids[-1]
            new_token_ids = new_token_ids[:-1]

        stop_check_offset = len(self.output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self.output_text += self._decode_next(token_id)
            if self._min_tokens and len(self.token_ids) <= self._min_tokens:
                # Stop strings only count after min_tokens (vLLM).
                stop_check_offset = len(self.output_text)
        if skipped_stop_token is not None:
            self.token_ids.append(skipped_stop_token)

        if not self._stop or len(self.token_ids) <= self._min_tokens:
            return None
        return self._check_stop_strings(stop_check_offset)

    def _decode_next(self, token_id: int) -> str:
        ids = self._ids
        ids.append(token_id)
        new_text = self._decode(ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing yet, or an incomplete multi-byte character: wait for more tokens.
            return ""
        # Slicing by length (not by prefix match) keeps going even when a decoder's
        # context effect changed earlier text in the window, as vLLM does.
        delta = new_text[len(self._prefix_text) :]
        # Slide the window: the text up to here is final. Drop ids nobody needs again.
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        if self._prefix_offset > 0:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._prefix_text = self._decode(ids[: self._read_offset])
        return delta

    def _check_stop_strings(self, stop_check_offset: int) -> str | None:
        """Find the earliest stop string that ends in the new text; truncate there."""
        new_char_count = len(self.output_text) - stop_check_offset
        if new_char_count <= 0:
            return None
        best_index, best_stop = -1, None
        for stop in self._stop:
            # Only a match that overlaps the new text can be new.
            start = max(0, stop_check_offset - len(stop) + 1)
            index = self.output_text.find(stop, start)
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is None:
            return None
        end = best_index + len(best_stop) if self._include_stop_str else best_index
        self.output_text = self.output_text[:end]
        self._last_output_text_offset = min(self._last_output_text_offset, end)
        return best_stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now. Until ``finished``, the last (longest stop string - 1)
        characters are held back so a partly generated stop string never leaks. With
        ``delta`` only text not returned before (by a delta call) is returned."""
        buffer_length = 0 if finished else self._stop_buffer_length
        length = len(self.output_text) - buffer_length
        if not delta:
            return self.output_text[:length] if buffer_length else self.output_text
        last = self._last_output_text_offset
        if last < length:
            self._last_output_text_offset = length
            return self.output_text[last:length]
        return ""
