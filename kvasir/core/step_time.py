"""A model of how long one engine step takes: ``t = base_s + per_token_s * num_tokens``.

The ``slo`` policy and ``--target-tpot-ms`` turn a time bound into a token budget with
it (``max_tokens_within``). The engine measures it at start-up (``EngineCore``
calibration steps) and keeps refining it from every step it runs (``observe``), so a
model that was measured on a quiet machine follows the machine's real load.
"""

from __future__ import annotations

import math


class StepTimeModel:
    """Linear step time in the number of scheduled tokens, fitted by exponentially
    weighted least squares (``decay`` per observation). Invariant: ``base_s >= 0`` and
    ``per_token_s > 0`` whatever it observed (a degenerate fit keeps the old slope)."""

    def __init__(self, base_s: float, per_token_s: float, decay: float = 0.98) -> None:
        if base_s < 0 or per_token_s <= 0:
            raise ValueError(
                f"step time model needs base_s >= 0 and per_token_s > 0, got {base_s}, "
                f"{per_token_s}"
            )
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.base_s = base_s
        self.per_token_s = per_token_s
        self.decay = decay
        # Weighted sums of 1, x, y, x*x, x*y over the observations.
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    @classmethod
    def fit(cls, samples: list[tuple[int, float]], decay: float = 0.98) -> StepTimeModel:
        """A model from (num_tokens, seconds) samples: at least two distinct sizes."""
        if len({n for n, _ in samples}) < 2:
            raise ValueError("fitting a step time model needs two distinct step sizes")
        model = cls(0.0, 1e-6, decay)
        for n, t in samples:
            model.observe(n, t)
        return model

    def predict(self, num_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens

    def max_tokens_within(self, seconds: float) -> int:
        """The most tokens a step may carry and still take at most ``seconds``."""
        if seconds <= self.base_s:
            return 0
        return int(math.floor((seconds - self.base_s) / self.per_token_s + 1e-9))

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        x, y = float(num_tokens), seconds
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        var = self._w * self._xx - self._x * self._x
        if var <= 1e-9 * max(self._xx * self._w, 1.0):
            return  # one step size so far: no slope to learn
        slope = (self._w * self._xy - self._x * self._y) / var
        if slope <= 0:
            return
        base = (self._y - slope * self._x) / self._w
        self.per_token_s = slope
        self.base_s = max(base, 0.0)

    def __repr__(self) -> str:
        return f"StepTimeModel(base_s={self.base_s:.6f}, per_token_s={self.per_token_s:.3e})"
