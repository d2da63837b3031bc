"""How many prompt tokens a step may carry while other rows are decoding.

On a compute-bound device a prompt token costs about as much as a decoding row's
token, and more the longer its context (its attention reads every earlier
position), so a fixed token budget either stalls decoding rows behind long
prompts or prefills slowly. The pacer sizes prompt chunks from measured step
times instead: a step carrying them may take at most `limit` times a step of
the decoding rows alone. A prompt token's cost is modelled as a + b × context,
fitted online (exponentially weighted least squares) from the steps' wall
times, so later, longer-context chunks get fewer tokens. With nobody decoding,
prompts take the whole token budget. Tensor-free: the engine reports each
step's wall time."""
from __future__ import annotations

import math

FORGET = 0.7
"""Weight kept by older measurements at each new one."""


class PrefillPacer:
    def __init__(self, limit: float, min_tokens: int) -> None:
        self.limit = limit
        """Slowdown allowed to decoding rows (0: no pacing)."""
        self.min_tokens = min_tokens
        """Prompt tokens a step may always carry, so a prompt keeps moving."""
        self.decode_s: float | None = None
        """Seconds per decoding row of a decode-only step (moving average)."""
        self._sums = [0.0] * 5  # weighted n, Σx, Σy, Σxx, Σxy of (context, seconds per prompt token)

    # -- planning ------------------------------------------------------------------
    def spare(self, decoding: int) -> float | None:
        """Seconds of prompt work this step may add next to `decoding` rows; None: unpaced."""
        if not self.limit or not decoding:
            return None
        if self.decode_s is None or not self._sums[0]:
            return 0.0  # not measured yet: only the cautious first chunk (see tokens)
        return (self.limit - 1) * self.decode_s * decoding

    def tokens(self, spare: float | None, context: int, cap: int, first: bool) -> tuple[int, float]:
        """Prompt tokens starting at position `context` that fit in `spare` seconds (at most
        `cap`; the step's first chunk always gets min_tokens), and their predicted seconds."""
        if spare is None:
            return cap, 0.0
        a, b = self.cost_model()
        if a is None:
            return (min(cap, self.min_tokens), 0.0) if first else (0, 0.0)
        per = a + b * context
        if b > 0:  # n (per + b n / 2) <= spare
            n = int((-per + math.sqrt(per * per + 2 * b * spare)) / b)
        else:
            n = int(spare / per)
        if first:
            n = max(n, self.min_tokens)
        n = min(n, cap)
        return n, n * (per + b * n / 2)

    def cost_model(self) -> tuple[float | None, float]:
        """(a, b): seconds per prompt token = a + b × its context position."""
        w, sx, sy, sxx, sxy = self._sums
        if not w:
            return None, 0.0
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        b = max(0.0, (sxy / w - mx * my) / var) if var > 1.0 else 0.0
        return max(my - b * mx, 1e-7), b

    # -- measuring -------------------------------------------------------------------
    def observe(self, decoding: int, chunks: list[tuple[int, int]], seconds: float) -> None:
        """A step's wall time, with its decoding rows and its prompt chunks as (start, tokens)."""
        tokens = sum(n for _, n in chunks)
        if not tokens:
            if decoding:
                self.decode_s = seconds / decoding if self.decode_s is None else 0.7 * self.decode_s + 0.3 * seconds / decoding
            return
        if decoding and self.decode_s is None:
            self.decode_s = seconds / (decoding + tokens)  # no decode-only step seen yet: equal shares
        per_token = max(seconds - (self.decode_s or 0.0) * decoding, 0.0) / tokens
        context = sum(n * (s + n / 2) for s, n in chunks) / tokens  # mean context of the prompt tokens
        self._sums = [FORGET * v for v in self._sums]
        for i, v in enumerate((1.0, context, per_token, context * context, context * per_token)):
            self._sums[i] += v
