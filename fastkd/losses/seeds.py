"""A resumable stream of 63-bit mask seeds (one per MGD forward)."""
from __future__ import annotations

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit value from any 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class SeedStream:
    """seed_k = splitmix64(base * 2^20 + k) mod 2^63 for k = 0, 1, 2, ...

    Pure host-side integer arithmetic (no device sync). ``state()`` / ``load_state()`` make a resumed
    run continue the very same stream; ``peek()`` shows the next seed without consuming it.
    """

    def __init__(self, base: int = 0):
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise ValueError(f"seed base must be an int >= 0, got {base!r}")
        self.base = base
        self.calls = 0

    def _at(self, k: int) -> int:
        return splitmix64(((self.base << 20) + k) & _M64) >> 1

    def peek(self) -> int:
        return self._at(self.calls)

    def next(self) -> int:
        seed = self._at(self.calls)
        self.calls += 1
        return seed

    def state(self) -> dict:
        return {"base": self.base, "calls": self.calls}

    def load_state(self, state: dict) -> None:
        self.base = int(state["base"])
        self.calls = int(state["calls"])
