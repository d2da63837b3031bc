"""Incremental detokenisation and stop strings.

Decoding token by token breaks multi-byte characters (a UTF-8 character split
over byte tokens decodes to U+FFFD until its last byte arrives) and
SentencePiece's leading-space marker (a word's space depends on what precedes
it). So each step decodes a short window of previous tokens plus the new ones
and emits only the text past the window — the scheme TGI and vLLM use."""
from __future__ import annotations

from dataclasses import dataclass, field

# Tokens of context decoded before the new ones; enough for any merge rule.
_CONTEXT = 6


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        # Seed with the prompt's tail so the first generated token gets its space right.
        self.ids = list(self.prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


@dataclass
class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that could start one."""

    stops: list[str]
    text: str = ""
    emitted: int = 0

    def push(self, new_text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped)."""
        self.text += new_text
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end]
            self.text = self.text[:end]
            self.emitted = end
            return out, True
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
