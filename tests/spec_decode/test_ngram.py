"""NgramProposer against a plain-Python prompt-lookup reference and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from kvasir.spec_decode.ngram import NgramProposer


def reference_propose(
    seq: list[int],
    k: int,
    lookup_min: int,
    lookup_max: int,
    cap: int,
    max_lookback: int | None,
) -> list[int]:
    """Longest n, latest earlier occurrence, within the last max_lookback tokens."""
    if max_lookback is not None:
        seq = seq[-max_lookback:]
    total = len(seq)
    for n in range(lookup_max, lookup_min - 1, -1):
        if total < n + 1:
            continue
        suffix = seq[total - n :]
        for j in range(total - n - 1, -1, -1):
            if seq[j : j + n] == suffix:
                return seq[j + n : j + n + min(k, cap)]
    return []


def make_batch(
    rng: np.random.Generator, seqs: list[list[int]], model_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A token_ids array with the sequences in shuffled rows, spare rows and garbage
    past each sequence's end (which the proposer must never read)."""
    num_rows = len(seqs) + 3
    token_ids = rng.integers(0, 1 << 20, size=(num_rows, model_len), dtype=np.int32)
    rows = rng.permutation(num_rows)[: len(seqs)].astype(np.int64)
    for r, s in zip(rows, seqs):
        token_ids[r, : len(s)] = s
    num_tokens = np.array([len(s) for s in seqs], dtype=np.int64)
    return token_ids, num_tokens, rows


def check(
    proposer: NgramProposer,
    token_ids: np.ndarray,
    num_tokens: np.ndarray,
    rows: np.ndarray,
    max_drafts: np.ndarray | None,
) -> None:
    k = proposer.num_speculative_tokens
    before = token_ids.copy()
    drafts, num_drafts = proposer.propose(token_ids, num_tokens, rows, max_drafts)
    assert (token_ids == before).all()
    assert drafts.shape == (len(rows), k) and drafts.dtype == np.int32
    assert num_drafts.shape == (len(rows),) and num_drafts.dtype == np.int64
    model_len = token_ids.shape[1]
    for b, (r, n) in enumerate(zip(rows, num_tokens)):
        cap = min(k, model_len - int(n))
        if max_drafts is not None:
            cap = min(cap, int(max_drafts[b]))
        want = reference_propose(
            token_ids[r, :n].tolist(),
            k,
            proposer.prompt_lookup_min,
            proposer.prompt_lookup_max,
            cap,
            proposer.max_lookback,
        )
        assert num_drafts[b] == len(want), (b, want, drafts[b])
        assert drafts[b, : len(want)].tolist() == want
        assert (drafts[b, len(want) :] == -1).all()


@pytest.mark.parametrize("seed", range(40))
def test_random_against_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 7))
    lookup_min = int(rng.integers(1, 4))
    lookup_max = lookup_min + int(rng.integers(0, 4))
    max_lookback = [None, lookup_max + 1, int(rng.integers(lookup_max + 1, 40))][seed % 3]
    proposer = NgramProposer(k, lookup_min, lookup_max, max_lookback=max_lookback)
    vocab = int(rng.integers(2, 6))  # small, so matches of every length happen
    model_len = int(rng.integers(8, 80))
    num_reqs = int(rng.integers(1, 12))
    lengths = rng.integers(0, model_len + 1, size=num_reqs)
    seqs = [rng.integers(0, vocab, size=int(n)).tolist() for n in lengths]
    token_ids, num_tokens, rows = make_batch(rng, seqs, model_len)
    max_drafts = None if seed % 2 else rng.integers(0, k + 1, size=num_reqs)
    check(proposer, token_ids, num_tokens, rows, max_drafts)


@pytest.mark.parametrize("seed", range(5))
def test_random_long_sequences(seed: int) -> None:
    # Longer sequences with a copied passage, the case prompt lookup is for.
    rng = np.random.default_rng(100 + seed)
    proposer = NgramProposer(4, 1, 4, max_lookback=[None, 300][seed % 2])
    seqs = []
    for _ in range(16):
        s = rng.integers(0, 50, size=int(rng.integers(1, 500))).tolist()
        a = int(rng.integers(0, len(s)))
        s += s[a : a + int(rng.integers(0, 20))]
        seqs.append(s)
    token_ids, num_tokens, rows = make_batch(rng, seqs, 600)
    check(proposer, token_ids, num_tokens, rows, None)


def propose_one(proposer: NgramProposer, seq: list[int], model_len: int = 64) -> list[int]:
    token_ids = np.zeros((2, model_len), dtype=np.int32)
    token_ids[1, : len(seq)] = seq
    drafts, num_drafts = proposer.propose(
        token_ids, np.array([len(seq)], dtype=np.int64), np.array([1], dtype=np.int64)
    )
    return drafts[0, : num_drafts[0]].tolist()


def test_repeated_phrase_proposes_its_continuation() -> None:
    # "the cat sat on the mat . the cat" -> "sat on the"
    seq = [1, 2, 3, 4, 1, 5, 6, 1, 2]
    assert propose_one(NgramProposer(3, 1, 3), seq) == [3, 4, 1]


def test_no_match_no_drafts() -> None:
    proposer = NgramProposer(4, 1, 3)
    assert propose_one(proposer, [1, 2, 3, 4, 5]) == []
    assert propose_one(proposer, [7]) == []
    assert propose_one(proposer, []) == []
    # [3, 4] occurs earlier, but a 3-gram is the shortest allowed.
    assert propose_one(NgramProposer(4, 3, 4), [1, 3, 4, 9, 2, 3, 4]) == []


def test_match_near_the_end_gives_fewer_drafts() -> None:
    # The only earlier [5, 6] is followed by just [7, 5, 6] before the sequence ends.
    assert propose_one(NgramProposer(5, 2, 2), [1, 2, 5, 6, 7, 5, 6]) == [7, 5, 6]
    # Latest occurrence of [8] overlaps the run: one token follows it.
    assert propose_one(NgramProposer(4, 1, 1), [3, 8, 8]) == [8]


def test_longest_n_wins() -> None:
    # Suffix [1, 2, 3]: the 1-gram [3] last occurred before 9 (more recent), the 3-gram
    # [1, 2, 3] before 4; the 3-gram wins.
    seq = [1, 2, 3, 4, 4, 3, 9, 9, 1, 2, 3]
    assert propose_one(NgramProposer(2, 1, 3), seq) == [4, 4]
    assert propose_one(NgramProposer(2, 1, 1), seq) == [9, 9]


def test_latest_occurrence_wins() -> None:
    seq = [1, 2, 5, 1, 2, 6, 1, 2]
    assert propose_one(NgramProposer(1, 2, 2), seq) == [6]


def test_caps_max_drafts_and_model_len() -> None:
    proposer = NgramProposer(4, 1, 2)
    seq = [1, 2, 3, 4, 5, 6, 1, 2]
    token_ids = np.zeros((3, 10), dtype=np.int32)
    token_ids[0, :8] = seq
    token_ids[2, :8] = seq
    rows = np.array([2, 0, 2], dtype=np.int64)
    num_tokens = np.array([8, 8, 8], dtype=np.int64)
    drafts, num_drafts = proposer.propose(
        token_ids, num_tokens, rows, max_drafts=np.array([0, 1, 4])
    )
    # Row length 10 leaves room for 2 drafts after 8 tokens.
    assert num_drafts.tolist() == [0, 1, 2]
    assert drafts.tolist() == [[-1, -1, -1, -1], [3, -1, -1, -1], [3, 4, -1, -1]]


def test_short_sequence_in_row_zero() -> None:
    # Row 0 holding fewer tokens than the batch's longest is gathered separately.
    proposer = NgramProposer(3, 1, 2)
    token_ids = np.full((3, 16), 7, dtype=np.int32)
    token_ids[0, :5] = [4, 5, 6, 1, 4]
    token_ids[2, :12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    drafts, num_drafts = proposer.propose(
        token_ids, np.array([12, 5], dtype=np.int64), np.array([2, 0], dtype=np.int64)
    )
    assert num_drafts.tolist() == [3, 3]
    assert drafts.tolist() == [[4, 5, 6], [5, 6, 1]]


def test_lookback_bounds_the_search() -> None:
    seq = [1, 2, 3] + [9] * 10 + [1, 2]
    assert propose_one(NgramProposer(2, 2, 2, max_lookback=None), seq) == [3, 9]
    assert propose_one(NgramProposer(2, 2, 2, max_lookback=15), seq) == [3, 9]
    assert propose_one(NgramProposer(2, 2, 2, max_lookback=14), seq) == []


def test_empty_batch() -> None:
    drafts, num_drafts = NgramProposer(3, 1, 2).propose(
        np.zeros((2, 8), dtype=np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    )
    assert drafts.shape == (0, 3) and num_drafts.shape == (0,)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0, 1, 2), "num_speculative_tokens"),
        ((2, 0, 2), "prompt_lookup_min"),
        ((2, 3, 2), "prompt_lookup_max"),
        ((2, 1, 4, 4), "max_lookback"),
    ],
)
def test_bad_arguments_name_the_field(args: tuple[int, ...], field: str) -> None:
    with pytest.raises(ValueError, match=f"speculative_config.{field}"):
        NgramProposer(*args)
