"""What an optimizer keeps per parameter besides its weights, and how 8-bit storage codes it."""

from __future__ import annotations

from ..formats import MOMENTUM_ROUNDINGS


class StateSpec:
    """A named optimizer state (e.g. ``exp_avg``) and how 8-bit storage codes it.

    A signed state's code rounds stochastically only where nearest rounding could undo a
    step (formats.quantize_momentum), by one of two ``rounding`` rules: "decay", where one
    step of decay is under half a level (the state keeps ``beta(group)`` of itself per
    step), or "movement", where the step moved the state by less than half a level; or
    it rounds every value stochastically ("stochastic", for a sequenced dither: see
    formats.dither). Its ``levels`` (formats.MOMENTUM_LEVEL_SETS) follow what the update
    rule does with it.
    """

    ROUNDINGS = MOMENTUM_ROUNDINGS

    def __init__(
        self, name: str, signed: bool, beta=None, levels: str = "square", rounding: str = "decay"
    ):
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"state {name!r}: rounding must be one of {self.ROUNDINGS}")
        if signed and rounding == "decay" and beta is None:
            raise ValueError(f"state {name!r}: the decay rule needs beta(group)")
        self.name = name
        self.signed = signed
        self.beta = beta
        self.levels = levels
        self.rounding = rounding

    @property
    def by_movement(self) -> bool:
        return self.signed and self.rounding == "movement"

    def forget(self, group: dict) -> float:
        """1 - beta as the kernels' scalar rows hold it (a float64 difference); 0 for the
        stochastic rule (quantize_momentum then dithers every value)."""
        if self.rounding == "stochastic":
            return 0.0
        return 1 - float(self.beta(group))

    @property
    def scale_name(self) -> str:
        return f"{self.name}_scale"


# SGD's and Muon's momentum: it keeps ``momentum`` of itself per step, and their updates
# are linear in it, so its code uses the linear-square levels (formats.py).
MOMENTUM_BUFFER = StateSpec(
    "momentum_buffer",
    signed=True,
    beta=lambda group: group["momentum"],
    levels="linear_square",
)


def check_roundings(cls) -> None:
    """Refuse an optimizer class whose declared roundings the step cannot honour."""
    if cls.master_rounding not in ("nearest", "stochastic"):
        raise TypeError(f"{cls.__name__}.master_rounding must be 'nearest' or 'stochastic'")
    if cls.dither not in ("hashed", "sequenced"):
        raise TypeError(f"{cls.__name__}.dither must be 'hashed' or 'sequenced'")
    if cls.master_rounding == "stochastic" and len(cls.state_specs) > 1:
        raise TypeError(
            f"{cls.__name__}: a stochastic master takes the dither's second half, which a "
            "second 8-bit state already uses; keep master_rounding = 'nearest'"
        )
