"""Which LoRA adapter occupies which device slot: the scheduler's tensor-free view
of the runner's stacked LoRA weights (`lora.LoraSlots`). A slot is busy while a
running row uses its adapter; idle slots keep their adapter (a later request for
it needs no copy) and are reassigned least recently used first.

Adapters with LoRA on MoE expert or router weights ("expert adapters") hold every
expert's A and B per slot, ~100-1,000x a linear adapter's bytes, so only the first
`expert_slots` slots carry those tables (expert_lora.ParamSlots): expert adapters
go there alone, and other adapters take the remaining slots first."""
from __future__ import annotations

from collections import OrderedDict


class LoraSlotTable:
    def __init__(self, max_loras: int, expert_slots: int | None = None) -> None:
        self.max_loras = max_loras
        self.expert_slots = max_loras if expert_slots is None else min(expert_slots, max_loras)
        self.holder: list[str | None] = [None] * max_loras
        self.users = [0] * max_loras
        self.slot_of: dict[str, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))

    def acquire(self, adapter_id: str, experts: bool = False) -> tuple[int, bool] | None:
        """(slot, whether its weights must be loaded), or None while every slot it may take is busy.
        experts: the adapter has expert / router LoRA, so it needs one of the first expert_slots slots."""
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            if self.users[slot] == 0:
                del self.idle[slot]
            self.users[slot] += 1
            return slot, False
        slot = self._pick(experts)
        if slot is None:
            return None
        del self.idle[slot]
        old = self.holder[slot]
        if old is not None:
            del self.slot_of[old]
        self.holder[slot], self.slot_of[adapter_id], self.users[slot] = adapter_id, slot, 1
        return slot, True

    def _pick(self, experts: bool) -> int | None:
        """The least recently used idle slot the adapter may take; other adapters leave expert slots to expert ones while they can."""
        if experts:
            return next((s for s in self.idle if s < self.expert_slots), None)
        return next((s for s in self.idle if s >= self.expert_slots), next(iter(self.idle), None))

    def release(self, slot: int) -> None:
        self.users[slot] -= 1
        if self.users[slot] == 0:
            self.idle[slot] = None

    def invalidate(self, slot: int) -> None:
        """The slot's weights could not be loaded: it holds no adapter (its users still release it)."""
        old = self.holder[slot]
        if old is not None:
            del self.slot_of[old]
            self.holder[slot] = None

    @property
    def busy(self) -> int:
        return self.max_loras - len(self.idle)

    @property
    def expert_busy(self) -> int:
        """Busy slots among the first expert_slots (the only ones expert adapters may take)."""
        return sum(1 for s in range(self.expert_slots) if self.users[s] > 0)
