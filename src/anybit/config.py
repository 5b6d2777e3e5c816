"""Quantization configs (small dataclasses, one entry point: :func:`anybit.quantize`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import AnybitError

_SCHEME = re.compile(r"^W(\d+)(\*?)(?:A(\d+))?(?:G(-?\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Scheme:
    wbits: int
    abits: int = 16
    group_size: int | None = None  # None: the method's default
    bit_balance: bool = False  # ABQ-LLM's "W2*"

    def __str__(self) -> str:
        s = f"W{self.wbits}{'*' if self.bit_balance else ''}A{self.abits}"
        return s + (f"G{self.group_size}" if self.group_size is not None else "")


def parse_scheme(text: str) -> Scheme:
    """Parse ``W4A16G128``, ``W3A16``, ``W2*A8``, ``W6A6`` (``A16`` = float activations)."""
    m = _SCHEME.match(text.strip())
    if not m:
        raise AnybitError(f"cannot parse scheme {text!r}; write it like W4A16G128, W3A16, W2*A8 or W6A6")
    wbits, star, abits, group = m.groups()
    return Scheme(int(wbits), int(abits) if abits else 16, int(group) if group else None, bool(star))


@dataclass
class QuantConfig:
    """What to quantize and how. Method-specific knobs live in ``options``.

    ``skip`` holds regexes of linear layers (full dotted names) kept in float;
    ``overrides`` maps regexes to field overrides, e.g. ``{"down_proj": {"wbits": 8}}``.
    """

    method: str = "rtn"
    wbits: int = 4
    abits: int = 16
    group_size: int = 128
    sym: bool = False
    seed: int = 0
    # activations (abits < 16): -1 per token, else per group of channels of each token
    act_group_size: int = -1
    act_sym: bool = False
    # ABQ-LLM's "W2*": an asymmetric wbits grid with 2^wbits + 1 levels, stored in wbits + 1 bits
    bit_balance: bool = False
    # also quantize the output head (RTN, asymmetric INT, group 128; untied from the
    # embedding) at this many bits; 0 keeps it in float (the GPTQ-family default)
    lm_head_bits: int = 0
    skip: tuple[str, ...] = ()
    overrides: dict[str, dict] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 1 <= self.wbits <= 8:
            raise AnybitError(f"--wbits must be between 2 and 8, got {self.wbits}")
        if self.abits != 16 and not 2 <= self.abits <= 8:
            raise AnybitError(f"--abits must be between 2 and 8, or 16 for float activations, got {self.abits}")
        if self.group_size != -1 and self.group_size < 1:
            raise AnybitError(f"--group-size must be -1 (per output channel) or a positive integer, got {self.group_size}")
        if self.act_group_size != -1 and self.act_group_size < 1:
            raise AnybitError(f"--act-group-size must be -1 (per token) or a positive integer, got {self.act_group_size}")
        if self.lm_head_bits and not 2 <= self.lm_head_bits <= 8:
            raise AnybitError(f"--lm-head-bits must be between 2 and 8 (or 0: float), got {self.lm_head_bits}")
        if self.bit_balance and (self.sym or self.wbits > 2):
            raise AnybitError("bit balance (W2*, W1*) applies to asymmetric 1- or 2-bit weights; drop --sym or the '*'")
        for pattern in (*self.skip, *self.overrides):
            try:
                re.compile(pattern)
            except re.error as e:
                raise AnybitError(f"bad layer regex {pattern!r}: {e}") from None

    @property
    def scheme(self) -> str:
        return f"W{self.wbits}{'*' if self.bit_balance else ''}A{self.abits}G{self.group_size}"

    def to_dict(self) -> dict:
        return asdict(self)
