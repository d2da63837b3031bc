"""How many prompt tokens a step may carry while other rows are decoding.

On a compute-bound device a prompt token costs about as much as a decoding row's
token, and more the longer its context (its attention reads every earlier
position), so a fixed token budget either stalls decoding rows behind long
prompts or prefills slowly. The pacer sizes prompt chunks from measured step
times instead: a step carrying them may take at most `limit` times a step of
the decoding rows alone.

A step is modelled as a fixed cost plus a cost per token that grows with the
token's context: seconds = c + Σ over the step's tokens (a + b × context), the
same for a decoding row's token as for a prompt token. The fixed part matters:
on CPU it is most of a step of a few decoding rows (the weights are read and the
layers' code runs once per step whatever the batch), so a model per decoding row
would misjudge a step of 30 rows from one of 1 by an order of magnitude. c, a
and b are fitted online by least squares on the steps' wall times, decode-only
steps and steps carrying prompts each forgetting only their own kind (hundreds
of decode-only steps in a row must not wash out what prompts taught). With
nobody decoding, prompts take the whole token budget. Tensor-free: the engine
reports each step's wall time.

The limit protects decoding rows only while they are at least as many as the
rows waiting for prompt work before their first token. A second of prompt work
delays each decoding row by that second and brings the first token of every
waiting row a second closer (the prompt work ahead of them is what they wait
for), so once waiting rows outnumber decoding ones (a burst of requests queued
behind the few that already stream) the step serves the many: prompts take the
whole token budget, as in vLLM's chunked prefill, and the decoding rows still get
their token every step (bench_long's burst of 64 requests over 8 system prompts:
its first tokens ~40% sooner, the burst done ~20% sooner). A long prompt arriving
beside a batch of decoding rows keeps the limit."""
from __future__ import annotations

import math

FORGET = 0.8
"""Weight kept by older measurements of a kind (decode-only / carrying prompts) at each new one."""
_SCALE = (1.0, 1e-3, 1e-6)
"""Features (1, tokens, Σ context) scaled to similar magnitudes before solving."""
_FITS = ((0, 1, 2), (0, 1), (1, 2), (1,))
"""Parameter subsets tried, (c, a, b) by index: the best fit with no negative cost wins."""


def context_sum(start: int, tokens: int) -> int:
    """Σ of the context (positions before it) of tokens at positions start..start+tokens-1."""
    return tokens * start + tokens * (tokens - 1) // 2


class _Sums:
    """Exponentially forgotten least-squares sums of (features, seconds) for one kind of step."""

    def __init__(self) -> None:
        self.gram = [[0.0] * 3 for _ in range(3)]
        self.rhs = [0.0] * 3
        self.yy = 0.0

    def add(self, x: tuple[float, float, float], y: float) -> None:
        for i in range(3):
            self.rhs[i] = FORGET * self.rhs[i] + x[i] * y
            for j in range(3):
                self.gram[i][j] = FORGET * self.gram[i][j] + x[i] * x[j]
        self.yy = FORGET * self.yy + y * y

    @property
    def weight(self) -> float:
        """The steps' forgotten count: the constant feature is 1, so it is the Gram matrix's first entry."""
        return self.gram[0][0]


class PrefillPacer:
    def __init__(self, limit: float, min_tokens: int) -> None:
        self.limit = limit
        """Slowdown allowed to decoding rows (0: no pacing)."""
        self.min_tokens = min_tokens
        """Prompt tokens a step may always carry, so a prompt keeps moving."""
        self._decode, self._prompt = _Sums(), _Sums()
        self._model: tuple[float, float, float] | None = None

    # -- planning ------------------------------------------------------------------
    def spare(self, decoding: int, decode_context: int, waiting: int = 0) -> float | None:
        """Seconds of prompt work this step may add next to `decoding` rows whose tokens' contexts
        sum to `decode_context`, while `waiting` rows wait for prompt work before their first token;
        None: unpaced (nobody decoding, or more rows waiting than decoding: see the module's doc)."""
        if not self.limit or not decoding or waiting > decoding:
            return None
        if self._model is None:
            return 0.0  # not measured yet: only the cautious first chunk (see tokens)
        c, a, b = self._model
        return (self.limit - 1) * (c + a * decoding + b * decode_context)

    def tokens(self, spare: float | None, context: int, cap: int, first: bool) -> tuple[int, float]:
        """Prompt tokens starting at position `context` that fit in `spare` seconds (at most
        `cap`; the step's first chunk always gets min_tokens), and their predicted seconds."""
        if spare is None:
            return cap, 0.0
        if self._model is None:
            return (min(cap, self.min_tokens), 0.0) if first else (0, 0.0)
        _, a, b = self._model
        per = a + b * context
        if b > 0:  # n (per + b n / 2) <= spare
            n = int((-per + math.sqrt(per * per + 2 * b * spare)) / b)
        else:
            n = int(spare / per)
        if first:
            n = max(n, self.min_tokens)
        n = min(n, cap)
        return n, n * (per + b * n / 2)

    def cost_model(self) -> tuple[float, float, float] | None:
        """(c, a, b): a step takes c + Σ over its tokens (a + b × context) seconds; None until a step
        carrying prompt tokens was measured (until steps of other sizes tell them apart, the fit
        drops c or b: the best fit whose costs are all non-negative)."""
        return self._model

    # -- measuring -------------------------------------------------------------------
    def observe(self, tokens: int, context: int, seconds: float, prompts: bool) -> None:
        """A step's wall time, with its token count, the sum of its tokens' contexts and whether
        it carried prompt tokens (or only decoding rows)."""
        if not tokens:
            return
        x = (_SCALE[0], tokens * _SCALE[1], context * _SCALE[2])
        (self._prompt if prompts else self._decode).add(x, seconds)
        if self._prompt.weight:
            self._model = self._fit()

    def _fit(self) -> tuple[float, float, float] | None:
        gram = [[d + p for d, p in zip(rd, rp)] for rd, rp in zip(self._decode.gram, self._prompt.gram)]
        rhs = [d + p for d, p in zip(self._decode.rhs, self._prompt.rhs)]
        yy = self._decode.yy + self._prompt.yy
        best: tuple[float, list[float]] | None = None
        for subset in _FITS:
            beta = _solve([[gram[i][j] for j in subset] for i in subset], [rhs[i] for i in subset])
            if beta is None or min(beta) < 0 or beta[subset.index(1)] <= 0:
                continue
            full = [0.0] * 3
            for i, v in zip(subset, beta):
                full[i] = v
            sse = yy - 2 * sum(full[i] * rhs[i] for i in range(3)) + sum(
                full[i] * gram[i][j] * full[j] for i in range(3) for j in range(3))
            if best is None or sse < best[0] - 1e-12 * yy:
                best = (sse, full)
        if best is None:
            return None
        return tuple(v * s for v, s in zip(best[1], _SCALE))  # type: ignore[return-value]


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """m x = v by Gaussian elimination with partial pivoting; None when m is (nearly) singular:
    the steps seen so far do not tell those parameters apart."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    tol = 1e-9 * max(abs(a[i][i]) for i in range(n))
    if tol <= 0:
        return None
    for col in range(n):
        p = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[p][col]) <= tol:
            return None
        a[col], a[p] = a[p], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for k in range(col, n + 1):
                a[r][k] -= f * a[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x
