"""An online predictor of a request's output length, for ``sjf``.

Requests are grouped by (tenant, prompt length bucket, max_tokens bucket) -- buckets
are powers of two -- and each group keeps an exponentially weighted mean of the output
lengths of its finished requests. A prediction reads the most specific group with
history, falling back to coarser ones ((prompt, max_tokens), (max_tokens,), all), and
to ``max_tokens`` itself with none; it never exceeds ``max_tokens``. One engine serves
one model, so the model is implicit in the key.
"""

from __future__ import annotations

from kvasir.core.request import Request

_ALPHA = 0.2  # weight of the newest observation


def _bucket(n: int) -> int:
    return max(n, 0).bit_length()


class OutputLengthPredictor:
    def __init__(self) -> None:
        self._mean: dict[tuple, float] = {}

    def _keys(self, request: Request) -> list[tuple]:
        assert request.max_tokens is not None
        p, m = _bucket(request.num_prompt_tokens), _bucket(request.max_tokens)
        return [(request.tenant, p, m), (p, m), (m,), ()]

    def predict(self, request: Request) -> int:
        assert request.max_tokens is not None
        for key in self._keys(request):
            mean = self._mean.get(key)
            if mean is not None:
                return max(1, min(round(mean), request.max_tokens))
        return request.max_tokens

    def observe(self, request: Request, num_output_tokens: int) -> None:
        for key in self._keys(request):
            old = self._mean.get(key)
            x = float(num_output_tokens)
            self._mean[key] = x if old is None else old + _ALPHA * (x - old)
