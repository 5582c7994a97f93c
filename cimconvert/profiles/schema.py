"""Chip profile schema (pydantic): what a profile YAML may contain and what each field means.

Conductances are in microsiemens (µS), times in seconds. ``x`` denotes a normalised conductance
``g / g_max``. The schema is documented for users in docs/PROFILES.md; the JSON Schema is written by
``cimconvert profiles schema``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

#: Tensor kinds that adapters assign. Matmul kinds can be analog; the rest always stay digital.
MatmulKind = Literal[
    "attention",
    "mlp",
    "expert",
    "shared_expert",
    "shared_expert_gate",
    "router",
    "ssm_in_proj",
    "ssm_x_proj",
    "ssm_dt_proj",
    "ssm_out_proj",
    "lm_head",
]
DigitalOnlyKind = Literal["embedding", "norm", "bias", "conv", "ssm_param", "other"]
TensorKind = MatmulKind | DigitalOnlyKind
MATMUL_KINDS: tuple[str, ...] = get_args(MatmulKind)
DIGITAL_ONLY_KINDS: tuple[str, ...] = get_args(DigitalOnlyKind)
TENSOR_KINDS = MATMUL_KINDS + DIGITAL_ONLY_KINDS


class Strict(BaseModel):
    """Base for all profile sections: unknown keys are errors, values are immutable, and every float is
    finite (NaN or ±.inf anywhere in a profile is refused: it would make every result NaN)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CurvePiece(Strict):
    """One piece of a fitted curve f(x): exactly one of ``poly``, ``log``, ``power``, then ``clip``.

    ``poly: [c0, c1, ...]`` gives c0 + c1·x + c2·x²…; ``log: [a, b]`` gives a·ln(x) + b;
    ``power: [c, p]`` gives c·x^p. ``below`` restricts the piece to x < below (pieces are tried in
    order; the last piece must have no ``below``).
    """

    below: float | None = Field(default=None, gt=0)
    poly: list[float] | None = Field(default=None, min_length=1)
    log: list[float] | None = Field(default=None, min_length=2, max_length=2)
    power: list[float] | None = Field(default=None, min_length=2, max_length=2)
    clip: list[float] | None = Field(default=None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _one_form(self) -> CurvePiece:
        forms = [f for f in (self.poly, self.log, self.power) if f is not None]
        if len(forms) != 1:
            raise ValueError("a curve piece needs exactly one of poly, log, power")
        if self.clip is not None and self.clip[0] > self.clip[1]:
            raise ValueError("clip must be [low, high] with low <= high")
        return self


Curve = Annotated[list[CurvePiece], Field(min_length=1)]


def _check_curve(curve: list[CurvePiece] | None, name: str) -> None:
    if curve is None:
        return
    if curve[-1].below is not None:
        raise ValueError(f"{name}: the last piece must not have 'below'")


class MappingSpec(Strict):
    """How weights become conductances and how a matrix is split into crossbar tiles."""

    tile_rows: int = Field(default=512, ge=1, le=65536, description="inputs (matrix columns) per tile")
    tile_cols: int = Field(default=512, ge=1, le=65536, description="outputs (matrix rows) per tile")
    scale: Literal["channel", "tile", "tensor"] = Field(
        default="channel",
        description="abs-max granularity mapped to g_max: per output channel within each tile, per tile, "
        "or one scale for the whole tensor; the inverse scale is applied digitally to the tile output",
    )
    g_max: float = Field(default=25.0, gt=0, description="µS, conductance of the largest |weight|")
    g_min: float = Field(default=0.0, ge=0, description="µS, conductance of a zero weight (per device)")
    differential: bool = Field(default=True, description="differential pair: w ∝ g+ − g−")
    devices_per_polarity: int = Field(default=1, ge=1, le=8, description="devices programmed per polarity")
    levels: int | None = Field(
        default=None, ge=2, le=65536, description="programmable conductance levels (null: continuous)"
    )

    @model_validator(mode="after")
    def _range(self) -> MappingSpec:
        if self.g_min >= self.g_max:
            raise ValueError("g_min must be below g_max")
        return self


class ProgrammingNoise(Strict):
    """Programming noise, drawn once per programming of the chip.

    ``poly``: g_prog = g_target + scale·σ(x)·N(0,1) with σ(x) = Σ c_i x^i in µS, fitted at
    ``ref_g_max`` and rescaled by g_max/ref_g_max; ``coeffs_by_time`` selects the coefficients by
    the inference time (models tabulated at fixed times, e.g. NeuRRAM). ``relative_gaussian``:
    w' = w + sigma·absmax·N(0,1), absmax taken at the mapping granularity. ``none``: exact.
    """

    kind: Literal["none", "poly", "relative_gaussian"] = "none"
    coeffs: list[float] | None = Field(default=None, min_length=1)
    coeffs_by_time: dict[float, list[float]] | None = None
    ref_g_max: float | None = Field(default=None, gt=0)
    sigma: float | None = Field(default=None, ge=0, le=10)
    scale: float = Field(default=1.0, ge=0, le=100)
    clamp_nonnegative: bool = Field(default=True, description="conductances cannot go below 0 µS")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ProgrammingNoise:
        if self.kind == "poly":
            if (self.coeffs is None) == (self.coeffs_by_time is None):
                raise ValueError("kind 'poly' needs exactly one of coeffs, coeffs_by_time")
            if self.ref_g_max is None:
                raise ValueError("kind 'poly' needs ref_g_max")
        if self.kind == "relative_gaussian" and self.sigma is None:
            raise ValueError("kind 'relative_gaussian' needs sigma")
        return self


class DriftSpec(Strict):
    """Conductance drift g(t) = g_prog·((t + t0)/t0)^(−ν), ν ~ |N(nu_mean(x), nu_std(x))| per device."""

    kind: Literal["none", "power_law"] = "none"
    t0: float = Field(default=20.0, gt=0)
    nu_mean: Curve | None = None
    nu_std: Curve | None = None
    scale: float = Field(default=1.0, ge=0, le=100)
    compensation: Literal["none", "global", "per_column"] = Field(
        default="global",
        description="digital output gain that undoes the average drift, measured once after drift",
    )

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DriftSpec:
        if self.kind == "power_law" and (self.nu_mean is None or self.nu_std is None):
            raise ValueError("kind 'power_law' needs nu_mean and nu_std")
        _check_curve(self.nu_mean, "nu_mean")
        _check_curve(self.nu_std, "nu_std")
        return self


class ReadNoise1f(Strict):
    """Accumulated 1/f read noise at t_inference: σ = |g_drift|·Q_s(x)·√ln((t + t0 + t_read)/(2·t_read))."""

    kind: Literal["none", "pcm_1f"] = "none"
    q_s: Curve | None = None
    t_read: float = Field(default=250e-9, gt=0)
    scale: float = Field(default=1.0, ge=0, le=100)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ReadNoise1f:
        if self.kind == "pcm_1f" and self.q_s is None:
            raise ValueError("kind 'pcm_1f' needs q_s")
        _check_curve(self.q_s, "q_s")
        return self


class MvmSpec(Strict):
    """Per matrix-vector-multiply effects (aihwkit IOParameters semantics, per tile).

    Input x is scaled by its abs-max (noise management) into [-1, 1] and quantised by the DAC; the
    tile computes y = W_n·x_n with W_n the weights normalised to |w| <= 1 at the mapping granularity,
    adds per-MVM noise, clips to ±out_bound and quantises with the ADC; the result is scaled back
    digitally and tile partial sums are added in digital.
    """

    # A b-bit converter has 2^b − 2 steps over [-bound, bound]: 1 bit leaves no step at all (every output
    # rounds to 0), 2 bits give the ternary {-1, 0, 1} grid, the smallest physically meaningful one.
    dac_bits: int | None = Field(default=None, ge=2, le=16, description="null: ideal DAC (at least 2 bits)")
    adc_bits: int | None = Field(default=None, ge=2, le=16, description="null: ideal ADC (at least 2 bits)")
    out_bound: float = Field(default=10.0, gt=0, description="ADC range ± in units of a full-scale row")
    out_noise: float = Field(default=0.0, ge=0, le=10, description="additive output noise std per MVM")
    w_noise: float = Field(default=0.0, ge=0, le=10, description="weight read noise std per MVM")
    w_noise_type: Literal["pcm_read", "additive_constant"] = Field(
        default="pcm_read",
        description="pcm_read: σ_i = w_noise·√(Σ_j |w_ij|·x_j²); additive_constant: σ_i = w_noise·‖x‖",
    )

    @property
    def active(self) -> bool:
        """True when any per-MVM effect is switched on."""
        return (
            self.dac_bits is not None
            or self.adc_bits is not None
            or self.out_noise > 0
            or self.w_noise > 0
        )


class FaultSpec(Strict):
    """Stuck devices, drawn once per programming: stuck at g=0 (off) or g=g_max (on)."""

    stuck_off: float = Field(default=0.0, ge=0, le=1)
    stuck_on: float = Field(default=0.0, ge=0, le=1)


class PlacementDefaults(Strict):
    """Default placement: tensor kinds kept on the digital unit even though they are matmuls."""

    digital: list[TensorKind] = Field(default_factory=lambda: ["lm_head", "router", "shared_expert_gate"])


class CostFigure(Strict):
    """One published cost figure: its value, the publication it comes from and how it was derived."""

    value: float = Field(ge=0, description="the figure, in the unit its field name ends with")
    source: str = Field(min_length=1, description="the publication (citation string) the value comes from")
    note: str = Field(default="", description="how the value was derived from the source, if not quoted")


#: Cost fields of :class:`CostSpec` and what each one prices (docs/PROFILES.md, docs/BUNDLE.md).
COST_FIELDS: dict[str, str] = {
    "analog_mac_energy_pj": "energy per analog multiply-accumulate (pJ)",
    "tile_read_energy_pj": "energy per read of one tile (one MVM on one crossbar array, pJ)",
    "adc_energy_pj": "energy per ADC conversion (pJ)",
    "dac_energy_pj": "energy per DAC conversion (pJ)",
    "digital_mac_energy_pj": "energy per digital multiply-accumulate (pJ)",
    "tile_read_latency_ns": "time of one tile read (one MVM on one crossbar array, ns)",
    "tile_area_mm2": "area of one crossbar array with its periphery (mm²)",
}


class CostSpec(Strict):
    """Published cost figures for the deployment report (energy, latency, area estimates per token).

    Every figure is optional: null means no published source gives it, and the report says "unknown"
    instead of estimating. ``converters_in_analog_energy``: the analog energy figure (per MAC or per tile
    read) is a whole-chip efficiency that already contains the DAC/ADC conversions, so they are not
    priced again. Costs only feed the report: they are left out of the profile's content hash.
    """

    analog_mac_energy_pj: CostFigure | None = None
    tile_read_energy_pj: CostFigure | None = None
    adc_energy_pj: CostFigure | None = None
    dac_energy_pj: CostFigure | None = None
    digital_mac_energy_pj: CostFigure | None = None
    tile_read_latency_ns: CostFigure | None = None
    tile_area_mm2: CostFigure | None = None
    converters_in_analog_energy: bool = Field(
        default=False, description="the analog energy figure already includes the DAC/ADC conversions"
    )

    @model_validator(mode="after")
    def _one_analog_energy(self) -> CostSpec:
        if self.analog_mac_energy_pj is not None and self.tile_read_energy_pj is not None:
            raise ValueError("give either analog_mac_energy_pj or tile_read_energy_pj, not both")
        return self


class ChipProfile(Strict):
    """A chip profile: device noise model, mapping, periphery and default placement."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.()=,:+-]+$")
    description: str = ""
    sources: list[str] = Field(default_factory=list)
    t_inference: float = Field(default=3600.0, ge=0, description="seconds between programming and use")
    mapping: MappingSpec = Field(default_factory=MappingSpec)
    programming: ProgrammingNoise = Field(default_factory=ProgrammingNoise)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    read_noise: ReadNoise1f = Field(default_factory=ReadNoise1f)
    mvm: MvmSpec = Field(default_factory=MvmSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)
    placement: PlacementDefaults = Field(default_factory=PlacementDefaults)
    costs: CostSpec = Field(
        default_factory=CostSpec, description="published cost figures for the report (null: unknown)"
    )
    parameters: dict[str, str] = Field(
        default_factory=dict,
        description="short names for dotted fields, settable as NAME:key=value (e.g. sigma)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChipProfile:
        coeffs = self.programming.coeffs_by_time
        tabulated = self.programming.kind == "poly" and coeffs is not None
        if tabulated and not any(math.isclose(t, self.t_inference) for t in coeffs):
            times = ", ".join(f"{t:g}" for t in sorted(coeffs))
            raise ValueError(f"t_inference {self.t_inference:g} s is not tabulated (use one of {times})")
        return self

    @property
    def is_ideal(self) -> bool:
        """True when the profile perturbs nothing (the digital reference)."""
        return (
            self.programming.kind == "none"
            and self.drift.kind == "none"
            and self.read_noise.kind == "none"
            and not self.mvm.active
            and self.faults.stuck_off == 0
            and self.faults.stuck_on == 0
            and self.mapping.levels is None
        )

    def canonical_json(self) -> str:
        """The profile as canonical JSON (sorted keys, no whitespace): the input of the content hash.

        ``costs`` is left out: it changes no simulated number, only the report's estimates, so adding a
        published figure to a profile keeps its bundles' hashes (and ``validate``'s profile check) valid.
        """
        data = self.model_dump(mode="json", exclude={"costs"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        """sha256 of the canonical JSON, recorded in manifests so results name the exact profile."""
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()
