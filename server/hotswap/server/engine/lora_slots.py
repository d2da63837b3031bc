"""Which LoRA adapter occupies which device slot: the scheduler's tensor-free view
of the runner's stacked LoRA weights (`lora.LoraSlots`). A slot is busy while a
running row uses its adapter; idle slots keep their adapter (a later request for
it needs no copy) and are reassigned least recently used first."""
from __future__ import annotations

from collections import OrderedDict


class LoraSlotTable:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.holder: list[str | None] = [None] * max_loras
        self.users = [0] * max_loras
        self.slot_of: dict[str, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))

    def acquire(self, adapter_id: str) -> tuple[int, bool] | None:
        """(slot, whether its weights must be loaded), or None while every slot is busy."""
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            if self.users[slot] == 0:
                del self.idle[slot]
            self.users[slot] += 1
            return slot, False
        if not self.idle:
            return None
        slot, _ = self.idle.popitem(last=False)
        old = self.holder[slot]
        if old is not None:
            del self.slot_of[old]
        self.holder[slot], self.slot_of[adapter_id], self.users[slot] = adapter_id, slot, 1
        return slot, True

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
