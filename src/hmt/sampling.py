"""`Sampling`: how an answer is drawn, one definition for the commands, the server and the lm-eval model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0; otherwise temperature, nucleus (top_p) and top-k (0: off) sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        checks = {
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid {', '.join(bad)}: temperature >= 0, top_p in (0, 1], top_k >= 0 and "
                "repetition_penalty > 0"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The arguments of `HMTForCausalLM.generate` (and of `hmt.ask.ask`) that draw this way."""
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.greedy:
            return {**settings, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            **settings,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
        }
