"""Per-request pooling parameters: an embedding request runs its prompt's prefill only
and returns one pooled final hidden state (vLLM's ``PoolingParams``)."""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("LAST", "MEAN")


@dataclass
class PoolingParams:
    """``pooling_type``: the last prompt token's final hidden state (``LAST``) or the
    mean over every prompt position (``MEAN``). ``dimensions``: keep the first this many
    components (Matryoshka truncation, before normalising); ``normalize``: L2-normalise.
    Raises ``ValueError`` naming the parameter on bad input."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        self.pooling_type = str(self.pooling_type).upper()
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}"
            )
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool)
            or not isinstance(self.dimensions, int)
            or self.dimensions < 1
        ):
            raise ValueError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")

    @property
    def needs_all_positions(self) -> bool:
        """Mean pooling needs every prompt position's hidden state: no prefix cache."""
        return self.pooling_type == "MEAN"
