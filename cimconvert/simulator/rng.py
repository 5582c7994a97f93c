"""Random draws: explicit ``torch.Generator`` streams, and the counter-based per-MVM normals.

Seeding lives here: :func:`stable_seed` derives every generator seed from (seed, name) and
:func:`tensor_generator` gives each tensor its own programming-noise stream. Everything random in the
simulator comes from a ``torch.Generator`` (:func:`randn`, :func:`rand`),
except the per-MVM noise in *counter* mode: there each draw is a pure function of a 96-bit key and the
element index (:func:`counter_normal`), built only from 32-bit integer ops (add, xor, logical shift,
wrapping multiply), exact int→float casts and float32 ``log``/``sqrt``/``cos``/``sin``, so that
onnxruntime computes the same values in standard ONNX ops (``onnx.analog_op``; equal up to the last
ulp of ``log``/``cos``/``sin``). ``cimconvert validate`` feeds both runtimes the same draws this way.

Counter generator ("cim-counter-v1"), for a call of ``n`` elements and key ``(ka, kb, kc)``:
``m = ⌈n/2⌉`` pairs ``j = 0..m-1``, ``H`` = lowbias32 (``x ^= x>>16; x *= 0x7feb352d; x ^= x>>15;
x *= 0x846ca68b; x ^= x>>16``, all mod 2³²), ``a = H(j + ka)``, ``b = H(a ^ kb)``, ``c = H(b ^ kc)``,
``u = ((h >> 8) | 1)·2⁻²⁴`` (exact, in (0, 1)), Box–Muller ``r = √(−2·ln u_b)``, ``θ = u_c·2π``:
element ``i`` is ``r·cos θ`` of pair ``i`` for ``i < m`` and ``r·sin θ`` of pair ``i − m`` otherwise.
The key of a call is ``run_key(seed, step) XOR node_key(tensor, expert)`` (sha256-derived words), with
``step`` the index of the model forward since the noise was applied.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

#: Key words: three unsigned 32-bit integers.
Key = tuple[int, int, int]
MASK32 = 0xFFFFFFFF
#: lowbias32 multipliers (C. Wellons' hash prospector) and shifts.
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
HASH_SHIFTS = (16, 15, 16)
#: Uniforms keep the top 24 bits of a hash, lowest bit forced to 1 (exact in float32, never 0).
UNIFORM_SHIFT = 8
UNIFORM_SCALE = 2.0**-24
#: 2π rounded to float32 (both runtimes multiply by this float32 constant).
TWO_PI = float(torch.tensor(2 * math.pi, dtype=torch.float32))


def stable_seed(seed: int, name: str) -> int:
    """63-bit generator seed from (seed, name) via sha256 (stable across runs and processes)."""
    digest = hashlib.sha256(f"cimconvert:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: Where programming draws are made, whatever device the weights live on: the same seed gives the same
#: draws on every device (they are moved to the weights' device; docs/SIMULATOR.md, "Devices").
PROGRAMMING_DEVICE = torch.device("cpu")


def tensor_generator(
    seed: int, name: str, device: torch.device | str = PROGRAMMING_DEVICE
) -> torch.Generator:
    """The programming-noise generator of one tensor: independent of which other tensors are analog.

    On the CPU by default (:data:`PROGRAMMING_DEVICE`), so a tensor programmed on a GPU gets the very draws
    it gets on the CPU; :func:`randn` / :func:`rand` move them to the weights' device.
    """
    return torch.Generator(device=device).manual_seed(stable_seed(seed, name))


def randn(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Standard normal draws in float32 on the generator's device, moved to ``like``'s device."""
    draw = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.to(like.device)


def rand(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws in float32 on the generator's device, moved to ``like``'s device."""
    draw = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.to(like.device)


# ----------------------------------------------------------------------------------------------
# Counter-based normals
# ----------------------------------------------------------------------------------------------


def key_words(text: str) -> Key:
    """Three 32-bit words from sha256(``cimconvert-counter:`` + text) (stable across processes)."""
    digest = hashlib.sha256(f"cimconvert-counter:{text}".encode()).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(3))  # type: ignore[return-value]


@lru_cache(maxsize=65536)
def node_key(tensor: str, expert: int = -1) -> Key:
    """Key words of one analog matmul (tensor name, expert index or -1); independent of the seed."""
    return key_words(f"mvm:{tensor}:{expert}")


def run_key(seed: int, step: int) -> Key:
    """Key words of forward number ``step`` (0, 1, ...) after programming with ``seed``."""
    return key_words(f"run:{seed}:{step}")


def xor_key(a: Key, b: Key) -> Key:
    """Word-wise XOR of two keys."""
    return (a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2])


def _signed32(value: int) -> int:
    """The int32 holding the bits of an unsigned 32-bit ``value`` (torch has no uint32 arithmetic)."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 tensors holding uint32 bits (a new tensor)."""
    return (x >> bits).bitwise_and_((1 << (32 - bits)) - 1)


def hash32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (uint32 bits, wrapping multiply); returns ``x``."""
    x.bitwise_xor_(_shift_right(x, HASH_SHIFTS[0]))
    x.mul_(_signed32(HASH_MULTIPLIERS[0]))
    x.bitwise_xor_(_shift_right(x, HASH_SHIFTS[1]))
    x.mul_(_signed32(HASH_MULTIPLIERS[1]))
    return x.bitwise_xor_(_shift_right(x, HASH_SHIFTS[2]))


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """(0, 1) float32 uniforms from hashes (top 24 bits, lowest forced to 1: exact casts)."""
    return _shift_right(h, UNIFORM_SHIFT).bitwise_or_(1).float().mul_(UNIFORM_SCALE)


@torch.no_grad()
def counter_normal(
    shape: torch.Size | tuple[int, ...], key: Key, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normals (float32, on ``device``) of ``shape``: element i is a pure function of (key, i).

    See the module docstring for the exact recipe (mirrored by ``onnx.analog_op``). The integer hashing is
    exact on every device; ``log``/``sqrt``/``cos``/``sin`` may differ in the last ulp between devices.
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    if pairs >= 1 << 31:
        raise ValueError(f"counter_normal: {n} elements in one call exceed the 2^32 limit")
    h = torch.arange(pairs, dtype=torch.int32, device=device).add_(_signed32(key[0]))
    h = hash32_(h).bitwise_xor_(_signed32(key[1]))
    radius = _uniform(hash32_(h)).log_().mul_(-2.0).sqrt_()
    angle = _uniform(hash32_(h.bitwise_xor_(_signed32(key[2])))).mul_(TWO_PI)
    out = torch.cat([radius * angle.cos(), radius.mul_(angle.sin_())])
    return out[:n].reshape(shape)


@dataclass
class CounterClock:
    """Forward counter shared by the per-MVM noise sources of one programming (``seed``).

    :meth:`tick` is called once per model forward *before* it runs: the first forward keeps step 0, each
    later one advances it by one. Matmuls called outside a forward use the current step.
    """

    seed: int
    step: int = 0
    started: bool = False
    key: Key = field(default=(0, 0, 0))

    def __post_init__(self) -> None:
        self.key = run_key(self.seed, self.step)

    def tick(self) -> Key:
        """Enter the next forward; returns its run key."""
        if self.started:
            self.step += 1
            self.key = run_key(self.seed, self.step)
        self.started = True
        return self.key


@dataclass(frozen=True)
class CounterNoise:
    """Per-MVM noise of one analog matmul in counter mode (used in place of a ``torch.Generator``)."""

    clock: CounterClock
    node: Key

    def normal(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Standard normals for the current forward of this matmul, on ``like``'s device."""
        return counter_normal(shape, xor_key(self.clock.key, self.node), like.device)


#: What drives per-MVM noise: a torch generator (``native``) or a counter source (``counter``).
NoiseSource = torch.Generator | CounterNoise


def mvm_normal(shape: torch.Size | tuple[int, ...], source: NoiseSource, like: torch.Tensor) -> torch.Tensor:
    """Per-MVM standard normals from either kind of source."""
    if isinstance(source, CounterNoise):
        return source.normal(shape, like)
    return randn(shape, source, like)
