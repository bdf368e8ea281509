"""The range of every numeric config value, declared where the field is: ``max_steps: PositiveInt = 1000``.

A field's type is ``Annotated[int | float, Range(...)]`` (the aliases below name the common ones); the recipe
loader checks the value against it when the recipe is read, so a zero batch size, a negative learning rate
or a NaN step count is refused by name before anything runs, not discovered as a crash (or a run that
trains nothing) later. Floats must also be finite everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (``lo_open`` / ``hi_open``: strict); None: unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "any finite number"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


ANY = Range()
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)

PositiveInt = Annotated[int, Range(lo=1)]  # counts that must be at least one: steps, batch sizes, ...
NonNegInt = Annotated[
    int, NON_NEGATIVE
]  # counts where 0 means "none" / "off": intervals, extra prompts, seeds
PositiveFloat = Annotated[float, POSITIVE]  # learning rates, temperatures, scales
NonNegFloat = Annotated[float, NON_NEGATIVE]  # weights and coefficients where 0 switches a term off
Fraction = Annotated[float, FRACTION]  # shares and probabilities in [0, 1]
AnyFloat = Annotated[float, ANY]  # signed values (offsets, biases): finite, otherwise free
AnyInt = Annotated[int, ANY]
