"""``kvasir eval perplexity``: sliding-window perplexity through the engine's own prompt
logprobs (the same model code, kernels, quantisation and KV cache that serve requests;
no second model implementation).

Windows of ``max_model_len`` tokens start every ``stride`` tokens; each window scores
only the tokens the previous one did not (the first window all but its first token), so
every scored token sees at least ``max_model_len - stride`` tokens of context, as in
HF's "perplexity of fixed-length models". ``--compare`` runs a second, baseline
configuration on the same windows and prints the relative change.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DATASET = os.path.join("..", "shared", "data", "tinyshakespeare.txt")


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the dataset
    end: int  # one past its last token
    first_scored: int  # first dataset position whose logprob counts (> begin)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    num_scored_tokens: int
    num_windows: int
    max_model_len: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(
    num_tokens: int, max_len: int, stride: int, max_windows: int | None = None
) -> list[Window]:
    """The windows over ``num_tokens`` tokens; every position in ``[1, end of the last
    window)`` is scored exactly once."""
    if max_len < 2:
        raise ValueError(f"max_model_len must be >= 2 for perplexity, got {max_len}")
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_model_len ({max_len})], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"the dataset must have at least 2 tokens, got {num_tokens}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_len, num_tokens)
        windows.append(Window(begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == num_tokens or (max_windows is not None and len(windows) == max_windows):
            break
    return windows


def perplexity(
    llm: Any,  # kvasir.entrypoints.llm.LLM
    token_ids: list[int],
    max_len: int,
    stride: int,
    max_windows: int | None = None,
    use_tqdm: bool = True,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``llm`` from its prompt logprobs, window by
    window (each window is one request of ``max_len`` prompt tokens)."""
    from kvasir.sampling_params import SamplingParams

    windows = sliding_windows(len(token_ids), max_len, stride, max_windows)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    pbar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(windows), desc="perplexity", unit="window", dynamic_ncols=True)
    nll_sum, num_scored = 0.0, 0
    for w in windows:
        ids = token_ids[w.begin : w.end]
        (out,) = llm.generate([ids], params, use_tqdm=False)
        lps = out.prompt_logprobs
        if lps is None or len(lps) != len(ids):
            raise RuntimeError(
                f"the engine returned {0 if lps is None else len(lps)} prompt logprobs "
                f"for a {len(ids)}-token window"
            )
        for p in range(w.first_scored - w.begin, len(ids)):
            entry = lps[p]
            assert entry is not None
            nll_sum -= entry[ids[p]].logprob
        num_scored += w.end - w.first_scored
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix_str(f"ppl {math.exp(nll_sum / num_scored):.3f}")
    if pbar is not None:
        pbar.close()
    nll = nll_sum / num_scored
    return PerplexityResult(math.exp(nll), nll, num_scored, len(windows), max_len, stride)


def load_dataset_tokens(tokenizer: Any, path: str) -> list[int]:
    """The dataset file's text, tokenised without special tokens."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"dataset {path!r} is empty")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _engine_kwargs(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from kvasir.engine.arg_utils import EngineArgs

    ea = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(ea).items()}
    # One window is one request of max_model_len prompt tokens plus the one token the
    # engine must be allowed to generate; prompt logprobs need every position computed.
    kwargs["max_model_len"] = args.max_model_len + 1
    kwargs["enable_prefix_caching"] = False
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise ValueError(f"compare has unknown engine field(s) {unknown}")
    kwargs.update(overrides)
    return kwargs


def _run_config(
    args: argparse.Namespace, overrides: dict[str, Any], token_ids: list[int] | None
) -> tuple[PerplexityResult, list[int], dict[str, Any]]:
    from kvasir.entrypoints.llm import LLM

    kwargs = _engine_kwargs(args, overrides)
    model = kwargs.pop("model")
    llm = LLM(model=model, **kwargs)
    if token_ids is None:
        tok = llm.get_tokenizer()
        if tok is None:
            raise ValueError("perplexity needs a tokenizer (the model has none; pass --tokenizer)")
        token_ids = load_dataset_tokens(tok, args.dataset)
    res = perplexity(
        llm, token_ids, args.max_model_len, args.stride, args.max_windows, not args.no_progress
    )
    llm.llm_engine.engine_core.shutdown()  # free the KV cache before a second engine
    shown = {k: kwargs.get(k) for k in ("quantization", "kv_cache_dtype", "dtype") if k in kwargs}
    from kvasir.models.default import default_model_path

    return res, token_ids, {"model": model or default_model_path(), **shown, **overrides}


def _baseline_overrides(text: str) -> dict[str, Any]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"compare must be a JSON object of engine fields ({e}): {text!r}"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"compare must be a JSON object of engine fields, got {text!r}")
    return d


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from kvasir.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(p)
    p.set_defaults(max_model_len=1024)
    g = p.add_argument_group("perplexity")
    g.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"UTF-8 text file (default: {DEFAULT_DATASET})",
    )
    g.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: max_model_len, disjoint windows)",
    )
    g.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    g.add_argument(
        "--compare",
        nargs="?",
        const="{}",
        default=None,
        metavar="JSON",
        help="also run a baseline: the same flags with the unquantised defaults "
        '(quantization none, kv_cache_dtype auto, no calculate_kv_scales) overridden by this JSON, e.g. \'{"dtype": '
        '"float32"}\'; prints the relative change',
    )
    g.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if args.stride is None:
        args.stride = args.max_model_len
    if not os.path.isfile(args.dataset):
        raise FileNotFoundError(f"dataset {args.dataset!r} does not exist")
    res, token_ids, cfg = _run_config(args, {}, None)
    summary: dict[str, Any] = {"config": cfg, **res.to_dict()}
    print(
        f"perplexity {res.perplexity:.4f} over {res.num_scored_tokens} tokens "
        f"({res.num_windows} windows of {res.max_model_len}, stride {res.stride})"
    )
    if args.compare is not None:
        base_over: dict[str, Any] = {}
        from kvasir.engine.arg_utils import EngineArgs

        fields = EngineArgs.__dataclass_fields__
        if "quantization" in fields:
            base_over["quantization"] = None
        if "kv_cache_dtype" in fields:
            base_over["kv_cache_dtype"] = "auto"
            base_over["calculate_kv_scales"] = False
        base_over.update(_baseline_overrides(args.compare))
        base, _, base_cfg = _run_config(args, base_over, token_ids)
        delta = res.perplexity / base.perplexity - 1.0
        summary["baseline"] = {"config": base_cfg, **base.to_dict()}
        summary["relative_delta"] = delta
        print(f"baseline perplexity {base.perplexity:.4f}; relative change {delta * 100:+.3f} %")
    line = json.dumps(summary)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line)
    return 0
