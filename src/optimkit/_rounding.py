"""Lower-precision optimizer state: the ``state_dtype`` option and unbiased stochastic rounding.

An optimizer given ``state_dtype=torch.bfloat16`` (float16 is refused) stores its moment buffers in
that dtype. Each step upcasts them to the compute dtype (float32, or the parameter's dtype
when that is wider), runs exactly the float32 math, and writes them back with stochastic
rounding: ``E[round(x)] == x``, so the small increments of a running average such as
``(1 - beta2) * g^2`` are not systematically lost to round-to-nearest (with bfloat16's 8-bit
mantissa, an increment below half an ulp of the buffer would otherwise vanish every step).

The random numbers come from :class:`RoundingRNG`, generators held on the optimizer (one per
device), seeded once from torch's global RNG: runs are reproducible given
``torch.manual_seed``, and the generator state travels in the optimizer's state_dict so a
resumed run continues identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: accepted values of ``state_dtype`` (``None``: each optimizer's own default). float16 is
#: refused (:func:`check_state_dtype`): its range cannot hold squared gradients.
STATE_DTYPES = (torch.float32, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: key under which an optimizer's state_dict carries the rounding generators' states
RNG_KEY = "state_rounding_rng"


#: the names ``state_dtype`` accepts as a string (config files, sd-scripts' ``key=value``
#: arguments), with or without a ``torch.`` prefix
STATE_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_FLOAT16_NAMES = ("float16", "fp16", "half")


def check_state_dtype(owner: str, value: Any) -> torch.dtype | None:
    """Return ``value`` as a valid ``state_dtype`` (a ``torch.dtype`` or None); a string names
    one (``'bfloat16'``, ``'bf16'``, ``'torch.bfloat16'``, ...; case-insensitive). Anything
    else raises the one-format ValueError listing the valid values."""
    if value is None or (isinstance(value, torch.dtype) and value in STATE_DTYPES):
        return value
    name = ""
    if isinstance(value, str):
        name = value.strip().lower()
        name = name[len("torch."):] if name.startswith("torch.") else name
        if name in STATE_DTYPE_NAMES:
            return STATE_DTYPE_NAMES[name]
    if value is torch.float16 or name in _FLOAT16_NAMES:
        raise ValueError(
            f"{owner}: invalid state_dtype={value!r}; expected None, torch.float32 or "
            "torch.bfloat16. float16 state is refused: exp_avg_sq holds squared gradients, and "
            "those below float16's smallest subnormal (6e-8: every |g| < 2.4e-4) flush to 0, "
            "after which the step is lr * m / eps, up to 10^4 times too large, silently. "
            "torch.bfloat16 takes the same memory with float32's range")
    names = ", ".join(repr(n) for n in STATE_DTYPE_NAMES)
    raise ValueError(
        f"{owner}: invalid state_dtype={value!r}; expected None, torch.float32 or "
        f"torch.bfloat16, or one of the names {names} (optionally prefixed 'torch.')"
    )


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a step computes in: float32, or float64 when any input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> None:
    """Write wider ``src`` into lower-precision ``dst``, unbiased: ``E[dst] == src``.

    ``src`` lies between its nearest representable value and the neighbour on its other side;
    the neighbour is chosen with probability equal to the fraction of the gap ``src`` covers.
    Values that are exact, infinite or NaN are written unchanged. ``generator`` draws the
    uniforms (torch's global RNG when ``None``); one ``src.numel()`` draw per call.
    """
    near = src.to(dst.dtype)
    nf = near.to(src.dtype)
    inf = torch.full_like(near, math.inf)
    other = torch.nextafter(near, torch.where(nf < src, inf, -inf))
    p_other = (src - nf).abs() / (other.to(src.dtype) - nf).abs()  # NaN at inf: keeps ``near``
    u = torch.rand(src.shape, generator=generator, device=src.device, dtype=src.dtype)
    dst.copy_(torch.where(u < p_other, other, near))


class RoundingRNG:
    """Per-device generators for stochastic rounding, seeded from torch's global RNG.

    The seed is drawn once, at construction (so it follows ``torch.manual_seed``); a device's
    generator is created on first use from that seed. ``state_dict`` holds only tensors and
    strings, so it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self) -> None:
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._gens: dict[str, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._gens[key] = gen
        return gen

    def state_dict(self) -> dict[str, Any]:
        return {"seed": torch.tensor(self.seed, dtype=torch.int64),
                "generators": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seed = int(sd["seed"])
        self._gens = {}
        for key, st in sd.get("generators", {}).items():
            self.get(torch.device(key)).set_state(st.to("cpu", torch.uint8))


def check_rng_state(owner: str, st: Any) -> None:
    """Refuse (``ValueError``) a saved :meth:`RoundingRNG.state_dict` that would not load;
    tried on scratch generators, so nothing of the optimizer's changes."""
    bad = f"{owner}.load_state_dict: malformed state_dict[{RNG_KEY!r}]"
    if not isinstance(st, dict) or "seed" not in st:
        raise ValueError(f"{bad}: expected a dict with 'seed' and 'generators'")
    try:
        seed = int(st["seed"])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{bad}: seed={st['seed']!r} is not an integer") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"{bad}: seed={seed} is outside [0, 2**64)")
    gens = st.get("generators", {})
    if not isinstance(gens, dict):
        raise ValueError(f"{bad}: 'generators' must be a dict of device -> state tensor")
    for key, g in gens.items():
        try:
            if not isinstance(g, Tensor):
                raise TypeError(type(g).__name__)
            torch.Generator(device=torch.device(key)).set_state(g.to("cpu", torch.uint8))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{bad}: the generator state for device {key!r} does not load ({e})") from None


def chunks(tensors: list[Tensor], budget_bytes: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose float32-equivalent size stays within ``budget_bytes``
    (a single larger tensor makes a range of its own): bounds the float32 working copies."""
    out, lo, size = [], 0, 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * max(t.element_size(), 4)
        if i > lo and size + nbytes > budget_bytes:
            out.append((lo, i))
            lo, size = i, 0
        size += nbytes
    out.append((lo, len(tensors)))
    return out


def chunk_budget(device: torch.device) -> int:
    """Working-copy budget per chunk: small on CPU (cache-sized pieces reuse warm pages), larger
    elsewhere (fewer kernel launches)."""
    return (1 << 20) if device.type == "cpu" else (32 << 20)


class LowPrecisionStateMixin:
    """Optimizer glue for ``state_dtype``, shared by Adam/AdamW and Prodigy.

    The choice lives on the optimizer, not in the param groups (torch.optim's and prodigyopt's
    group keys stay exactly theirs, so state_dicts move both ways); it survives pickling, and
    the rounding generators' states travel in ``state_dict()[RNG_KEY]``.
    """

    _state_dtype: torch.dtype | None = None
    _rounding_rng: RoundingRNG | None = None

    def _setup_state_dtype(self, state_dtype: Any) -> None:
        self._state_dtype = check_state_dtype(type(self).__name__, state_dtype)
        self._rounding_rng = RoundingRNG() if self._state_dtype in LOW_PRECISION else None

    def _round_into(self, dst: Tensor, src: Tensor) -> None:
        """Write a working copy back into its stored state buffer (stochastically if narrower)."""
        if dst.dtype in LOW_PRECISION and src.dtype != dst.dtype and self._rounding_rng is not None:
            stochastic_round_(dst, src, self._rounding_rng.get(dst.device))
        else:
            dst.copy_(src)

    def __getstate__(self) -> dict[str, Any]:
        st = super().__getstate__()  # type: ignore[misc]
        rng = self._rounding_rng
        return {**st, "_state_dtype": self._state_dtype,
                "_rounding_rng_state": rng.state_dict() if rng is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls __setstate__ (state and groups only): the
        # generators are replaced only when unpickling an optimizer that had them.
        unpickling = "_rounding_rng_state" in state
        rng_state = state.pop("_rounding_rng_state", None)
        super().__setstate__(state)  # type: ignore[misc]
        if unpickling:
            self._rounding_rng = None
        if rng_state is not None:
            self._rounding_rng = RoundingRNG.__new__(RoundingRNG)
            self._rounding_rng._gens = {}
            self._rounding_rng.load_state_dict(rng_state)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        if self._rounding_rng is not None:
            sd[RNG_KEY] = self._rounding_rng.state_dict()
        return sd

    def _check_state_dict(self, sd: Any) -> None:
        super()._check_state_dict(sd)  # type: ignore[misc]
        if RNG_KEY in sd and self._rounding_rng is not None:
            check_rng_state(type(self).__name__, sd[RNG_KEY])

    def _load_checked(self, sd: dict[str, Any]) -> None:
        if RNG_KEY in sd:
            rng_state, sd = sd[RNG_KEY], {k: v for k, v in sd.items() if k != RNG_KEY}
            if self._rounding_rng is not None:
                self._rounding_rng.load_state_dict(rng_state)
        super()._load_checked(sd)  # type: ignore[misc]

    def _load_rounding_rng(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Restore the generators if saved; return the state_dict without that key."""
        if not isinstance(state_dict, dict) or RNG_KEY not in state_dict:
            return state_dict  # the base class rejects what is malformed
        if self._rounding_rng is not None:
            self._rounding_rng.load_state_dict(state_dict[RNG_KEY])
        return {k: v for k, v in state_dict.items() if k != RNG_KEY}

    def _recast_loaded_state(self, state_dict: dict[str, Any], keys: tuple[str, ...],
                             dtype_for: Any) -> None:
        """torch casts loaded floating state to the parameter's dtype; put each buffer in the
        dtype this optimizer keeps (``dtype_for(p)``), from the saved value (no double rounding
        through the parameter's dtype)."""
        saved_state = state_dict["state"]
        for saved, mine in zip(state_dict["param_groups"],
                               self.param_groups):  # type: ignore[attr-defined]
            for pid, p in zip(saved.get("params", []), mine["params"]):
                st = self.state.get(p)  # type: ignore[attr-defined]
                if not st or pid not in saved_state:
                    continue
                want = dtype_for(p)
                for key in keys:
                    v = saved_state[pid].get(key)
                    if isinstance(v, Tensor) and v.is_floating_point():
                        st[key] = v.to(device=st[key].device, dtype=want, copy=True)
