r"""Lookahead (Zhang, Lucas, Hinton, Ba 2019): k fast steps forward, one step back.

Any optimizer (the "fast" one) takes ``k`` steps; then the slow weights :math:`\phi` move a
fraction ``alpha`` of the way towards the fast weights :math:`\theta` and the fast weights
restart from there::

    every step t:             theta <- base_step(theta)
    every k-th step:          phi   <- phi + alpha * (theta - phi)
                              theta <- phi
    pullback_momentum:
        "none"      the base optimizer's momentum is left as it is
        "reset"     the momentum buffer is set to 0
        "pullback"  m <- alpha * m + (1 - alpha) * m_slow ;  m_slow <- m

``phi`` starts at the parameters as they are at the first ``step()`` (normally the initial
parameters), so the first synchronisation already pulls back. ``m_slow`` starts at 0. The
"momentum buffer" is the base state's ``momentum_buffer`` (SGD, RMSprop with momentum) or
``exp_avg`` (Adam, AdamW, RAdam, Prodigy); a reset/pullback mode over a base optimizer that
keeps neither raises at the first synchronisation instead of silently doing nothing.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._impl import group_by_device_dtype
from .._validation import fail

__all__ = ["Lookahead", "PULLBACK_MODES", "MOMENTUM_KEYS", "SLOW_KEYS"]

PULLBACK_MODES = ("none", "reset", "pullback")
#: base-optimizer state keys that hold a momentum (first-moment) buffer, tried in this order
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
_OWNER = "Lookahead"


def _check_hparams(k: Any, alpha: Any, pullback_momentum: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        fail(_OWNER, "k", k, "an integer k >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        fail(_OWNER, "alpha", alpha, "0 < alpha <= 1")
    if pullback_momentum not in PULLBACK_MODES:
        fail(_OWNER, "pullback_momentum", pullback_momentum, " or ".join(repr(m) for m in PULLBACK_MODES))


#: the per-parameter state keys Lookahead keeps itself (never in the base optimizer's state)
SLOW_KEYS = ("slow_param", "slow_momentum")


def _base_state_of(owner: Lookahead, p: Tensor) -> Any:
    state = owner.base.state
    if p not in state:
        state[p] = {}  # what torch's defaultdict does; also right for a plain dict
    return state[p]


class _ParamState(MutableMapping):
    """``lookahead.state[p]`` for a parameter with slow weights: one mapping over two stores.

    Reads, writes and deletes of ``slow_param`` / ``slow_momentum`` go to Lookahead's own
    store, every other key to the base optimizer's ``state[p]``. Code that walks an
    optimizer's state and writes each entry back (Lightning's ``_optimizer_to_device`` does
    ``v[key] = move(v[key])`` after every ``load_state_dict``) therefore moves the slow weights
    where they live instead of copying them into the base's state.
    """

    __slots__ = ("_owner", "_p")

    def __new__(cls, *args: Any) -> Any:
        # Generic collection code rebuilds a mapping as type(m)(items) (lightning_utilities'
        # apply_to_collection, used by Lightning 1.x's optimizer_to_device); that gives a plain
        # dict here, which ``lookahead.state[p] = ...`` then splits by key.
        if len(args) == 1:
            return dict(args[0])
        return super().__new__(cls)

    def __init__(self, owner: Lookahead, p: Tensor) -> None:
        self._owner, self._p = owner, p

    def __copy__(self) -> dict[Any, Any]:
        return dict(self.items())

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        # the entries, not the optimizer this view points into
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def _store(self, key: Any) -> Any:
        if key in SLOW_KEYS:
            return self._owner._slow.get(self._p, {})
        return self._owner.base.state.get(self._p, {})

    def __getitem__(self, key: Any) -> Any:
        return self._store(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in SLOW_KEYS:
            _base_state_of(self._owner, self._p)[key] = value
        elif key == "slow_param" or "slow_param" in self._owner._slow.get(self._p, {}):
            self._owner._slow.setdefault(self._p, {})[key] = value
        else:
            raise KeyError(f"{_OWNER}: {key!r} without 'slow_param' (this parameter has no slow weights)")

    def __delitem__(self, key: Any) -> None:
        store = self._store(key)
        del store[key]
        if key == "slow_param":  # no slow weights left: recaptured from the parameter at the next step
            self._owner._slow.pop(self._p, None)

    def __iter__(self) -> Iterator[Any]:
        yield from self._owner.base.state.get(self._p, {})
        yield from self._owner._slow.get(self._p, {})

    def __len__(self) -> int:
        return len(self._owner.base.state.get(self._p, {})) + len(self._owner._slow.get(self._p, {}))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self.items())}}}"


class _StateView(MutableMapping):
    """``lookahead.state``: the base optimizer's state, with the slow weights visible too.

    ``state[p]`` is the base's own dict for a parameter without slow weights (before the first
    ``step()``), else a :class:`_ParamState` over both. Whichever way a caller writes, the slow
    keys (:data:`SLOW_KEYS`) land in Lookahead's store and the others in the base's:
    ``state[p] = mapping`` replaces both parts of ``p``'s state, split by key.
    """

    def __init__(self, owner: Lookahead) -> None:
        self._owner = owner

    def __getitem__(self, p: Tensor) -> Any:
        if p in self._owner._slow:
            return _ParamState(self._owner, p)
        return self._owner.base.state[p]

    def __setitem__(self, p: Tensor, value: Any) -> None:
        if not isinstance(value, Mapping):
            self._owner.base.state[p] = value  # a custom optimizer's own per-parameter object
            return
        items = list(value.items())  # before clearing: value may be a view of p's own state
        slow = {k: v for k, v in items if k in SLOW_KEYS}
        if slow and "slow_param" not in slow:
            raise ValueError(f"{_OWNER}: state[p] = ... has {sorted(slow)} but no 'slow_param'")
        self._owner.base.state[p] = {k: v for k, v in items if k not in SLOW_KEYS}
        if slow:
            self._owner._slow[p] = slow
        else:
            self._owner._slow.pop(p, None)  # recaptured from the parameter at the next step

    def __delitem__(self, p: Tensor) -> None:
        found = p in self._owner.base.state or p in self._owner._slow
        self._owner.base.state.pop(p, None)
        self._owner._slow.pop(p, None)
        if not found:
            raise KeyError(p)

    def __iter__(self) -> Iterator[Tensor]:
        yield from self._owner.base.state
        for p in self._owner._slow:
            if p not in self._owner.base.state:
                yield p

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _base_part(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's state_dict inside a Lookahead one: without ``"lookahead"``, and
    without slow keys in the per-parameter state (optimkit <= 0.1.0 let Lightning's
    ``_optimizer_to_device`` copy them there; the real ones are in ``"lookahead"``)."""
    base = {key: v for key, v in state_dict.items() if key != "lookahead"}
    state = base.get("state")
    if isinstance(state, dict) and any(
        isinstance(st, dict) and any(k in st for k in SLOW_KEYS) for st in state.values()
    ):
        base["state"] = {
            pid: {k: v for k, v in st.items() if k not in SLOW_KEYS} if isinstance(st, dict) else st
            for pid, st in state.items()
        }
    return base


def _build_base(params: Any, optimizer: Any, lr: float | None, optimizer_args: Any,
                base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer of ``Lookahead(params, optimizer=..., lr=..., **kwargs)``, built by
    :func:`optimkit.create_optimizer` (registry names, aliases, class paths; every argument
    checked against the base's signature). Errors are re-raised naming Lookahead."""
    if optimizer is None:
        raise ValueError(
            f"{_OWNER}: invalid base={type(params).__name__}; expected a constructed "
            "torch.optim.Optimizer, or parameters with the base optimizer's name: "
            "Lookahead(params, lr=..., optimizer='prodigy', k=5, **base_args)"
        )
    if optimizer_args is not None and not isinstance(optimizer_args, Mapping):
        fail(_OWNER, "optimizer_args", optimizer_args, "a dict of the base optimizer's arguments")
    args = dict(optimizer_args or {})
    both = sorted(set(args) & set(base_kwargs))
    if both:
        raise ValueError(f"{_OWNER}: base argument(s) {both} given both in optimizer_args and as keywords")
    args.update(base_kwargs)
    if not isinstance(optimizer, (str, type)):
        fail(_OWNER, "optimizer", optimizer, "an optimizer name ('prodigy', 'adamw', ...), class path or class")
    from ..factory.create import create_optimizer  # the factory imports this module

    try:
        base = create_optimizer(optimizer, params, lr=lr, optimizer_args=args)
    except ValueError as e:
        raise ValueError(f"{_OWNER}(optimizer={optimizer!r}): {e}") from None
    except TypeError as e:  # a third-party class that raises TypeError for a bad argument
        raise ValueError(f"{_OWNER}(optimizer={optimizer!r}): {type(e).__name__}: {e}") from None
    if isinstance(base, Lookahead):
        raise ValueError(f"{_OWNER}: invalid optimizer={optimizer!r}; expected a base optimizer, not a Lookahead")
    return base


class Lookahead(torch.optim.Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` with Lookahead's slow weights.

    The wrapper is itself a ``torch.optim.Optimizer``: learning-rate schedulers, GradScaler and
    step hooks accept it. ``param_groups`` and ``defaults`` *are* the base optimizer's (the same
    objects, so a scheduler changing ``lr`` changes the base's), ``state`` shows the base's
    state plus the slow weights (each key stored in one place: ``slow_param`` /
    ``slow_momentum`` in Lookahead's store, the others in the base's, however they are
    written), and ``zero_grad`` / closures / ``add_param_group`` go to the base.

    Two ways to build it:

    * ``Lookahead(base, k=5, alpha=0.5)``: ``base`` is a constructed optimizer;
    * ``Lookahead(params, lr=1.0, optimizer="prodigy", k=6, d_coef=2)``: ``params`` (an
      ``nn.Module``, parameters or param groups) and the base optimizer's name; Lookahead builds
      the base with :func:`optimkit.create_optimizer`. This is the ``cls(params, lr=lr,
      **kwargs)`` form that trainers which import an optimizer by class path call (kohya-ss
      sd-scripts: ``--optimizer_type optimkit.Lookahead --optimizer_args "optimizer='prodigy'"
      "k=6" "d_coef=2"``). It is the same optimizer, and has the same ``state_dict``, as
      ``Lookahead(Prodigy(params, lr=1.0, d_coef=2), k=6)``.

    Args:
        base: the fast optimizer, already constructed (optimkit's, torch's, prodigyopt's, ...);
            or the parameters to build it over (then ``optimizer`` is required).
        k: synchronise every ``k`` base steps (integer ``>= 1``; ``k=1`` with ``alpha=1`` is the
            base optimizer unchanged).
        alpha: fraction of the way the slow weights move towards the fast weights at each
            synchronisation, ``0 < alpha <= 1``; smaller = more conservative.
        pullback_momentum: what happens to the base's momentum at a synchronisation:
            ``"none"`` (keep), ``"reset"`` (zero it) or ``"pullback"`` (interpolate it towards
            its value at the previous synchronisation, like the weights).
        optimizer: with parameters: the base optimizer, as a registry name or alias
            (``"prodigy"``, ``"adamw"``), a class path (``"torch.optim.NAdam"``) or a class.
        lr: with parameters: the base's learning rate (``None``: the registry's default, e.g.
            1.0 for Prodigy).
        optimizer_args: with parameters: more base arguments as a dict; needed only for a base
            argument named like one of Lookahead's own (RMSprop's ``alpha``:
            ``optimizer_args={"alpha": 0.9}``).
        **base_kwargs: with parameters: the base optimizer's arguments (``d_coef=2``,
            ``betas=(0.9, 0.99)``, ``state_dtype="bf16"``), checked and coerced by the factory.

    Raises:
        ValueError: ``k``, ``alpha`` or ``pullback_momentum`` out of range; a Lookahead as the
            base; parameters without ``optimizer``; base arguments next to a constructed base;
            an unknown or invalid base argument (the factory's message, prefixed with
            ``Lookahead(optimizer=...)``). Nothing is built when it raises.

    ``state_dict()`` is the base's state_dict plus a ``"lookahead"`` entry (k, alpha, mode, the
    step counter, the slow tensors by parameter index): tensors, numbers and strings only, so
    ``torch.load(weights_only=True)`` reads it, and a resumed run continues bit-identically.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()

    Reference: M. Zhang, J. Lucas, G. Hinton, J. Ba, "Lookahead Optimizer: k steps forward,
    1 step back", NeurIPS 2019.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer | Iterable[Any],
        k: int = 5,
        alpha: float = 0.5,
        pullback_momentum: str = "none",
        *,
        optimizer: str | type | None = None,
        lr: float | None = None,
        optimizer_args: Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_hparams(k, alpha, pullback_momentum)
        if isinstance(base, torch.optim.Optimizer):
            if isinstance(base, Lookahead):
                raise ValueError(f"{_OWNER}: base is already a Lookahead; nesting is not supported")
            given = ([f"optimizer={optimizer!r}"] if optimizer is not None else []) + (
                [f"lr={lr!r}"] if lr is not None else []) + (
                ["optimizer_args=..."] if optimizer_args else []) + sorted(base_kwargs)
            if given:
                raise ValueError(
                    f"{_OWNER}: invalid {', '.join(given)} with a constructed base optimizer "
                    f"({type(base).__name__}); expected them only when Lookahead is given parameters "
                    "(Lookahead(params, lr=..., optimizer='prodigy', ...)): pass them to the base's "
                    "constructor instead"
                )
        else:
            base = _build_base(base, optimizer, lr, optimizer_args, base_kwargs)
        # torch.optim.Optimizer.__init__ is not called: it would build param_groups of its own,
        # and ours must be the base's list. Set up what the base class's methods rely on.
        self.base = base
        self.k = k
        self.alpha = float(alpha)
        self.pullback_momentum = pullback_momentum
        self._slow: dict[Tensor, dict[str, Tensor]] = {}
        self._lookahead_step = 0  # base steps taken through this wrapper
        self._init_hooks()
        self._patch_step_function()

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # ------------------------------------------------------------ the base's, shared
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    @property
    def state(self) -> _StateView:  # type: ignore[override]
        return _StateView(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its slow weights start at its next ``step()``."""
        self.base.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"{_OWNER}(k={self.k}, alpha={self.alpha}, pullback_momentum="
                f"{self.pullback_momentum!r}, base={self.base!r})")

    def __getstate__(self) -> dict[str, Any]:
        return {
            "base": self.base, "k": self.k, "alpha": self.alpha,
            "pullback_momentum": self.pullback_momentum, "_slow": self._slow,
            "_lookahead_step": self._lookahead_step,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._patch_step_function()

    # ------------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base step (``closure`` goes to the base); every ``k``-th, a synchronisation."""
        self._capture_slow()
        loss = self.base.step() if closure is None else self.base.step(closure)
        self._lookahead_step += 1
        if self._lookahead_step % self.k == 0:
            self._synchronise()
        return loss

    def _params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for g in self.param_groups:
            for p in g["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    @torch.no_grad()
    def _capture_slow(self) -> None:
        # Lazily, so weights loaded into the model after the optimizer was built are the ones
        # the slow weights start from, and groups added later start where they are added.
        if len(self._slow) == sum(len(g["params"]) for g in self.param_groups):
            return
        for p in self._params():
            if p not in self._slow:
                self._slow[p] = {"slow_param": p.detach().clone()}

    @torch.no_grad()
    def _synchronise(self) -> None:
        params = self._params()
        buffers: list[tuple[Tensor, Tensor]] = []  # (param, its momentum buffer)
        if self.pullback_momentum != "none":
            # Find every buffer before changing anything, so a failure leaves all as it was.
            for p in params:
                st = self.base.state.get(p)
                if not st:
                    continue  # never stepped (no gradient yet): no momentum to treat
                key = next((k for k in MOMENTUM_KEYS if isinstance(st.get(k), Tensor)), None)
                if key is None:
                    raise RuntimeError(
                        f"{_OWNER}: pullback_momentum={self.pullback_momentum!r} needs a momentum "
                        f"buffer ({' or '.join(MOMENTUM_KEYS)}) in the base optimizer's state, but "
                        f"{type(self.base).__name__} keeps only {sorted(st)} for a parameter of "
                        f"shape {tuple(p.shape)}; use pullback_momentum='none'"
                    )
                buffers.append((p, st[key]))
        slow = [self._slow[p]["slow_param"] for p in params]
        for (lists, _) in group_by_device_dtype(params, slow).values():
            fast_l, slow_l = lists
            tc.foreach_lerp_(slow_l, fast_l, self.alpha)  # phi <- phi + alpha (theta - phi)
            tc.foreach_copy_(fast_l, slow_l)  # theta <- phi
        for p, buf in buffers:
            if self.pullback_momentum == "reset":
                buf.zero_()
            else:
                st = self._slow[p]
                if "slow_momentum" not in st:
                    st["slow_momentum"] = torch.zeros_like(buf)
                m_slow = st["slow_momentum"]
                buf.mul_(self.alpha).add_(m_slow, alpha=1 - self.alpha)  # m <- a m + (1-a) m_slow
                m_slow.copy_(buf)

    # ------------------------------------------------------------------ state_dict
    def _index_of(self) -> dict[int, int]:
        """id(param) -> index, numbered exactly as ``torch.optim.Optimizer.state_dict`` does."""
        ids: dict[int, int] = {}
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in ids:
                    ids[id(p)] = i
                i += 1
        return ids

    def state_dict(self) -> dict[str, Any]:
        """The base's state_dict plus ``"lookahead"``: hyperparameters, counter, slow tensors."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.base.state_dict())
        index = self._index_of()
        sd["lookahead"] = {
            "k": self.k,
            "alpha": self.alpha,
            "pullback_momentum": self.pullback_momentum,
            "step": self._lookahead_step,
            "slow_state": {index[id(p)]: dict(st) for p, st in self._slow.items() if id(p) in index},
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked before anything changes.

        Like torch's optimizers restore the saved group hyperparameters, the saved ``k``,
        ``alpha`` and ``pullback_momentum`` replace the current ones.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        bad = f"{_OWNER}.load_state_dict: malformed state_dict"
        if not isinstance(state_dict, dict) or "lookahead" not in state_dict:
            raise ValueError(
                f"{bad}: no 'lookahead' entry; to load a plain {type(self.base).__name__} "
                "state_dict use lookahead.base.load_state_dict(...)"
            )
        la = state_dict["lookahead"]
        if not isinstance(la, dict) or not {"k", "alpha", "pullback_momentum", "step", "slow_state"} <= set(la):
            raise ValueError(f"{bad}: 'lookahead' must hold k, alpha, pullback_momentum, step, slow_state")
        _check_hparams(la["k"], la["alpha"], la["pullback_momentum"])
        step = la["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{bad}: step={step!r}; expected an integer >= 0")
        by_index: dict[int, Tensor] = {}
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                by_index.setdefault(i, p)
                i += 1
        if not isinstance(la["slow_state"], dict):
            raise ValueError(f"{bad}: 'slow_state' must be a dict, got {type(la['slow_state']).__name__}")
        slow: dict[Tensor, dict[str, Tensor]] = {}
        for idx, st in la["slow_state"].items():
            if isinstance(idx, bool) or not isinstance(idx, int) or idx not in by_index:
                raise ValueError(f"{bad}: slow weights for unknown parameter index {idx!r}")
            p = by_index[idx]
            if not isinstance(st, dict) or not isinstance(st.get("slow_param"), Tensor):
                raise ValueError(f"{bad}: slow state of parameter {idx} has no 'slow_param' tensor")
            for key, v in st.items():
                if key not in SLOW_KEYS or not isinstance(v, Tensor):
                    raise ValueError(f"{bad}: unexpected slow state entry {key!r} of parameter {idx}")
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{bad}: slow state {key!r} of parameter {idx} has shape {tuple(v.shape)}, "
                        f"the parameter has {tuple(p.shape)}"
                    )
            slow[p] = {
                key: v.detach().to(device=p.device, dtype=p.dtype if key == "slow_param" else v.dtype,
                                   copy=True)
                for key, v in st.items()
            }
        # Every check of Lookahead's own part is done: from here only the base's load can fail,
        # and then nothing of Lookahead has changed either.
        self.base.load_state_dict(_base_part(state_dict))
        self.k, self.alpha, self.pullback_momentum = la["k"], float(la["alpha"]), la["pullback_momentum"]
        self._lookahead_step = step
        self._slow = slow
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
