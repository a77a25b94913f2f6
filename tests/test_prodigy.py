"""optimkit.Prodigy against prodigyopt 1.1.2 (the oracle), and what we do beyond it.

The parity runs train a small MLP with a LoRA-style adapter (one factor zero-initialised, so
prodigyopt stores its ``p0`` as a 0-dim zero) and a 0-dim scalar on scikit-learn's bundled
handwritten digits in float64, 300 steps, three param groups in some rows (one with lr=0), a
parameter that loses its gradient for a step, and an lr warmup schedule in some rows. The
rows are a covering design over the hyperparameters (listed at ``ROWS``), not a product.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from functools import lru_cache
from typing import Any

import prodigyopt
import pytest
import torch

import optimkit
from optimkit._rounding import RNG_KEY
from optimkit.optimizers.prodigy import NonFiniteStepError

STEPS = 300
DROP_GRAD_STEP = 100  # w2 gets no gradient at this step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine is shared; one thread keeps these runs fast and deterministic.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target)


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def r(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter((torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3).to(dtype))

        self.w1, self.b1, self.w2, self.b2 = r(16, 64), r(16), r(10, 16), r(10)
        self.lora_a = r(2, 64)
        self.lora_b = torch.nn.Parameter(torch.zeros(16, 2, dtype=dtype))  # LoRA "up": zeros
        self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))  # 0-dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w1.dtype)
        h = torch.tanh(x @ self.w1.T + self.b1 + (x @ self.lora_a.T) @ self.lora_b.T)
        return ((h @ self.w2.T + self.b2) * (1 + self.scale)).double()

    def groups(self, layout: str, second: dict[str, Any]) -> list[dict[str, Any]]:
        first = [self.w1, self.b1, self.lora_a, self.lora_b, self.scale]
        if layout == "two":
            return [{"params": first}, {"params": [self.w2, self.b2], **second}]
        # three groups, the last frozen with lr=0
        return [{"params": first}, {"params": [self.w2], **second},
                {"params": [self.b2], "lr": 0.0, "weight_decay": 0.0}]


def train(make_opt, steps: int = STEPS, *, layout: str = "two", second: dict | None = None,
          warmup: bool = False, net: Net | None = None, opt=None, start: int = 0,
          dtype: torch.dtype = torch.float64):
    x, y = _digits()
    net = net if net is not None else Net(dtype)
    opt = opt if opt is not None else make_opt(net.groups(layout, second or {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 50)) if warmup else None
    g = torch.Generator().manual_seed(1)
    for t in range(start + steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        if t < start:
            continue
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        if t == DROP_GRAD_STEP:
            net.w2.grad = None
        opt.step()
        if sched is not None:
            sched.step()
    return net, opt


def ref_opt(groups, **kw):
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints from its constructor
        return prodigyopt.Prodigy(groups, **kw)


def assert_same(net_a, opt_a, net_b, opt_b, *, rtol=1e-10, atol=1e-12, what=""):
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"{what} param {name}: {m}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), f"{what} state keys of {name}: {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].shape == sb[k].shape, f"{what} state {name}[{k}] shape"
                torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol,
                                           msg=lambda m: f"{what} state {name}[{k}]: {m}")
            else:
                assert sa[k] == sb[k], f"{what} state {name}[{k}]: {sa[k]} != {sb[k]}"
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        for key in ("d", "d_max", "d_numerator", "d_hat", "d_denom"):
            assert float(ga[key]) == pytest.approx(float(gb[key]), rel=rtol, abs=1e-300), f"{what} {key}"
        assert ga["k"] == gb["k"], what


def snapshot(net, opt) -> Any:
    return (copy.deepcopy([p.detach() for p in net.parameters()]),
            copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(net.parameters()) if p in opt.state}),
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def assert_bitwise(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                           b.reshape(-1).contiguous().view(torch.uint8)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------- parity
#: A covering design: every level of every factor appears, and the pairs that interact
#: (weight_decay x decouple, beta1 x coupled decay, slice_p x safeguard_warmup, growth_rate x
#: d_coef) appear together. Each row: (prodigyopt kwargs, layout, second group, lr warmup).
ROWS = [
    (dict(), "two", {}, False),
    (dict(weight_decay=0.01, use_bias_correction=True, slice_p=3, d_coef=2.0), "two",
     {"weight_decay": 0.0}, False),
    (dict(weight_decay=0.01, decouple=False, safeguard_warmup=True, slice_p=11, betas=(0.0, 0.999),
          growth_rate=1.02), "two", {"weight_decay": 0.001}, True),
    (dict(betas=(0.0, 0.99), d_coef=0.5, growth_rate=1.02, d0=1e-4, weight_decay=0.05,
          use_bias_correction=True), "two", {}, False),
    (dict(decouple=False, weight_decay=1e-3, slice_p=3, d_coef=0.5, d0=1e-5, beta3=0.9), "frozen",
     {"eps": 1e-6, "safeguard_warmup": True}, False),
    (dict(slice_p=11, growth_rate=1.02, use_bias_correction=True, weight_decay=0.02), "frozen",
     {}, True),
    (dict(betas=(0.0, 0.999), d_coef=2.0, safeguard_warmup=True, decouple=False, weight_decay=0.01,
          d0=1e-7), "two", {"weight_decay": 0.0}, False),
]


@pytest.mark.parametrize("row", range(len(ROWS)))
def test_parity_with_prodigyopt_300_steps(row):
    kw, layout, second, warmup = ROWS[row]
    run = dict(layout=layout, second=second, warmup=warmup)
    net_ref, opt_ref = train(lambda g: ref_opt(g, **kw), **run)
    assert opt_ref.param_groups[0]["d"] > 10 * kw.get("d0", 1e-6)  # d adapted: not vacuous
    for impl in (dict(foreach=True), dict(foreach=False)):
        net, opt = train(lambda g: optimkit.Prodigy(g, **kw, **impl), **run)
        assert_same(net, opt, net_ref, opt_ref, what=str(impl))
        assert opt.state[net.lora_b]["p0"].dim() == 0  # prodigyopt's zero-parameter p0


def test_growth_rate_first_jump_is_prodigyopt_by_default_and_bounded_when_strict():
    # prodigyopt lets d jump straight from d0 to d_hat; strict_growth bounds every step.
    kw = dict(growth_rate=1.05, d0=1e-6)
    _, ref = train(lambda g: ref_opt(g, **kw), 12)
    _, ours = train(lambda g: optimkit.Prodigy(g, **kw), 12)
    assert ours.param_groups[0]["d"] == ref.param_groups[0]["d"]
    assert ours.param_groups[0]["d"] > 1e-6 * 1.05 ** 12  # the unbounded first jump

    ds = []
    net, opt = Net(), None
    for t in range(12):
        net, opt = train(lambda g: optimkit.Prodigy(g, strict_growth=True, **kw), 1, net=net,
                         opt=opt, start=t)
        ds.append(opt.param_groups[0]["d"])
    prev = 1e-6
    for d in ds:
        assert prev <= d <= prev * 1.05 * (1 + 1e-12)
        prev = d
    assert ds[-1] > 1e-6  # it did grow


# ---------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kw", [dict(weight_decay=0.01, slice_p=3), dict(betas=(0.0, 0.999))])
def test_prodigyopt_state_dict_loads_and_continues_identically(kw):
    net_ref, opt_ref = train(lambda g: ref_opt(g, **kw), 40)
    net = Net()
    net.load_state_dict(net_ref.state_dict())
    opt = optimkit.Prodigy(net.groups("two", {}), **kw)
    opt.load_state_dict(roundtrip(opt_ref.state_dict()))
    assert opt.param_groups[0]["d"] == opt_ref.param_groups[0]["d"]
    train(None, 40, net=net, opt=opt, start=40)
    train(None, 40, net=net_ref, opt=opt_ref, start=40)
    assert_same(net, opt, net_ref, opt_ref)


def test_our_state_dict_loads_into_prodigyopt_and_continues_identically():
    kw = dict(weight_decay=0.01, use_bias_correction=True)
    net, opt = train(lambda g: optimkit.Prodigy(g, **kw), 40)
    net_ref = Net()
    net_ref.load_state_dict(net.state_dict())
    opt_ref = ref_opt(net_ref.groups("two", {}), **kw)
    opt_ref.load_state_dict(roundtrip(opt.state_dict()))
    train(None, 40, net=net, opt=opt, start=40)
    train(None, 40, net=net_ref, opt=opt_ref, start=40)
    assert_same(net, opt, net_ref, opt_ref)


def test_state_dict_roundtrip_and_keys():
    net, opt = train(lambda g: optimkit.Prodigy(g), 5)
    sd = roundtrip(opt.state_dict())
    for key in ("d", "d0", "d_max", "d_numerator", "d_hat", "d_denom", "k", "effective_lr",
                "skipped_steps", "betas", "beta3", "slice_p", "growth_rate", "fsdp_in_use"):
        assert key in sd["param_groups"][0], key
    assert set(sd["state"][0]) == {"step", "s", "p0", "exp_avg", "exp_avg_sq"}
    net2 = Net()
    net2.load_state_dict(net.state_dict())
    opt2 = optimkit.Prodigy(net2.groups("two", {}))
    opt2.load_state_dict(sd)
    train(None, 5, net=net, opt=opt, start=5)
    train(None, 5, net=net2, opt=opt2, start=5)
    assert_same(net, opt, net2, opt2, rtol=0, atol=0)


def test_malformed_state_dict_is_rejected_before_loading():
    _, opt = train(lambda g: optimkit.Prodigy(g), 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["s"] = torch.zeros(3, dtype=torch.float64)
    fresh = optimkit.Prodigy(Net().groups("two", {}))
    with pytest.raises(ValueError, match="'s'"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0


# ---------------------------------------------------------------------- implementations
def _tiny(dtype=torch.float64, seed=0, zero=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (), (0, 3), (11,)]
    ps = [torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)) for s in shapes]
    if zero:
        ps[-1].data.zero_()
    return ps


def _grads(ps, t, nan_at=None):
    g = torch.Generator().manual_seed(100 + t)
    for i, p in enumerate(ps):
        # a gradient pulling towards 1 plus noise: d has something to estimate
        p.grad = ((p.detach().double() - 1.0) + 0.1 * torch.randn(p.shape, generator=g,
                                                                   dtype=torch.float64)).to(p.dtype)
        if nan_at is not None and nan_at[0] == i:
            p.grad.view(-1)[nan_at[1]] = nan_at[2]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(betas=(0.0, 0.999), weight_decay=0.1, decouple=False, slice_p=3, use_bias_correction=True),
    dict(weight_decay=0.1, safeguard_warmup=True, slice_p=2, growth_rate=1.1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_and_foreach_agree(kw, dtype):
    runs = []
    if dtype == torch.bfloat16:  # d0's first steps are below bf16 resolution (see below)
        kw = {**kw, "stochastic_rounding": True}
    for foreach in (False, True):
        torch.manual_seed(0)  # both paths draw the rounding noise in the same order
        ps = _tiny(dtype, zero=True)
        opt = optimkit.Prodigy(ps, foreach=foreach, **kw)
        for t in range(30):
            _grads(ps, t)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert oa.param_groups[0]["d"] == pytest.approx(ob.param_groups[0]["d"], rel=1e-6)
    assert oa.param_groups[0]["d"] > 2e-6  # d moved away from d0: not vacuous
    # Not bitwise in float32: BLAS sums a strided and a contiguous dot in different orders,
    # and beta1=0 (sign-like steps) amplifies that over 30 steps to ~3e-5 relative.
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for k, v in oa.state[a].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, ob.state[b][k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ host syncs
_SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


def _count_syncs(monkeypatch) -> dict[str, int]:
    """Count every way a tensor's value reaches Python.

    On CPU there is no device queue to watch (torch.cuda.set_sync_debug_mode needs CUDA), but
    a host sync is exactly a tensor-to-Python conversion: ``.item()``, ``.tolist()``,
    ``float()``/``int()``/``bool()``/``__index__``, ``.numpy()``, or the comparison functions that
    return a Python bool. Each is wrapped to count calls; on CUDA each of these would block.
    """
    n = {"n": 0}
    for name in _SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            n["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    for name in ("equal", "allclose", "is_nonzero"):
        orig = getattr(torch, name)

        def wrapped_fn(*a, _orig=orig, **k):
            n["n"] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(torch, name, wrapped_fn)
    return n


@pytest.mark.parametrize("kw", [dict(), dict(slice_p=3, betas=(0.0, 0.99), weight_decay=0.1,
                                             decouple=False, fsdp_in_use=True)])
def test_foreach_path_syncs_once_per_step(monkeypatch, kw):
    ps = _tiny(zero=True)  # includes a zero parameter: the p0 decision is in the same sync
    groups = [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}]
    opt = optimkit.Prodigy(groups, foreach=True, **kw)
    counter = _count_syncs(monkeypatch)
    for t in range(4):
        _grads(ps, t)
        before = counter["n"]
        opt.step()
        assert counter["n"] - before == 1, f"step {t}: {counter['n'] - before} host syncs"


def test_sync_counter_sees_syncs(monkeypatch):
    # The method detects syncs: the per-tensor reference and prodigyopt sync per parameter.
    ps = _tiny()
    opt = optimkit.Prodigy(ps, foreach=False)
    ps2 = _tiny()
    ref = ref_opt(ps2)
    counter = _count_syncs(monkeypatch)
    _grads(ps, 0)
    opt.step()
    assert counter["n"] >= 2 * len(ps)
    _grads(ps2, 0)
    before = counter["n"]
    ref.step()
    assert counter["n"] - before >= 2 * len(ps2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_sync_per_step():  # pragma: no cover - CUDA only
    ps = [p.detach().cuda().requires_grad_() for p in _tiny(zero=True)]
    opt = optimkit.Prodigy(ps)
    for t in range(2):
        _grads(ps, t)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
        torch.cuda.set_sync_debug_mode(0)
        assert len([x for x in w if "synchroniz" in str(x.message)]) <= 1


# ---------------------------------------------------------------------- beyond prodigyopt
def test_grad_is_never_modified_prodigyopt_does():
    kw = dict(weight_decay=0.1, decouple=False)
    for make, mutates in ((lambda ps: optimkit.Prodigy(ps, foreach=True, **kw), False),
                          (lambda ps: optimkit.Prodigy(ps, foreach=False, **kw), False),
                          (lambda ps: ref_opt(ps, **kw), True)):
        ps = _tiny()
        opt = make(ps)
        _grads(ps, 0)
        before = [p.grad.clone() for p in ps]
        opt.step()
        same = all(torch.equal(b, p.grad) for b, p in zip(before, ps))
        assert same != mutates  # prodigyopt adds weight_decay * p into p.grad; we never do


def test_effective_lr_is_the_next_steps_multiplier():
    ps = _tiny()
    opt = optimkit.Prodigy([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.0}],
                           use_bias_correction=True, eps=1e-8)
    for t in range(12):
        _grads(ps, t)
        g = opt.param_groups[0]
        eff = g["effective_lr"]
        b1, b2 = g["betas"]
        k = g["k"]
        assert eff == pytest.approx(g["d"] * g["lr"] * math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)),
                                    rel=1e-15)
        assert opt.param_groups[1]["effective_lr"] == 0.0
        before = ps[0].detach().clone()
        opt.step()
        st, d_new = opt.state[ps[0]], opt.param_groups[0]["d"]
        want = -eff * st["exp_avg"] / (st["exp_avg_sq"].sqrt() + d_new * 1e-8)
        torch.testing.assert_close(ps[0].detach() - before, want, rtol=1e-9, atol=1e-15)


def test_d_coef_larger_means_larger_d():
    # d_hat = d_coef * r / ||s||_1: over a short run the final d rises with d_coef.
    ds = [train(lambda g, c=c: optimkit.Prodigy(g, d_coef=c), 10)[1].param_groups[0]["d"]
          for c in (0.1, 0.5, 1.0, 2.0, 10.0)]
    assert all(a < b for a, b in zip(ds, ds[1:])), ds
    # At the second step r and ||s||_1 do not depend on d_coef yet: d_hat is proportional.
    hats = [train(lambda g, c=c: optimkit.Prodigy(g, d_coef=c), 2)[1].param_groups[0]["d_hat"]
            for c in (0.5, 1.0, 2.0)]
    assert hats[0] * 2 == pytest.approx(hats[1], rel=1e-12)
    assert hats[1] * 2 == pytest.approx(hats[2], rel=1e-12)


def test_lr_zero_group_is_frozen_prodigyopt_is_not():
    for beta1 in (0.9, 0.0):
        kw = dict(weight_decay=0.1, betas=(beta1, 0.999))
        outs = []
        for make in (lambda g: optimkit.Prodigy(g, **kw), lambda g: ref_opt(g, **kw)):
            ps = _tiny()
            frozen0 = [p.detach().clone() for p in ps[3:]]
            opt = make([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.0}])
            for t in range(5):
                _grads(ps, t)
                opt.step()
            outs.append(all(torch.equal(a, p) for a, p in zip(frozen0, ps[3:])))
            assert opt.param_groups[0]["d"] > 0
        assert outs == [True, False]  # ours frozen; prodigyopt decays (and with beta1=0 steps)


def test_mixed_learning_rates_raise_clearly():
    ps = _tiny()
    with pytest.raises(ValueError, match=r"largest lr .* or 0"):
        optimkit.Prodigy([{"params": ps[:2], "lr": 1.0}, {"params": ps[2:], "lr": 0.5}])
    opt = optimkit.Prodigy([{"params": ps[:2]}, {"params": ps[2:]}])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.0})  # fine
    opt.param_groups[1]["lr"] = 0.3  # e.g. a per-group scheduler
    _grads(ps, 0)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="lr values"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, ps)) and len(opt.state) == 0


def test_global_hyperparameters_must_agree_across_groups():
    ps = _tiny()
    with pytest.raises(ValueError, match="d_coef is global"):
        optimkit.Prodigy([{"params": ps[:2]}, {"params": ps[2:], "d_coef": 2.0}])


def test_late_param_group_joins_the_running_estimate():
    ps = _tiny()
    opt = optimkit.Prodigy(ps[:3])
    for t in range(5):
        _grads(ps, t)
        opt.step()
    opt.add_param_group({"params": ps[3:]})
    for key in ("d", "d_max", "d_numerator", "k"):
        assert opt.param_groups[1][key] == opt.param_groups[0][key]


def test_constructor_prints_nothing(capsys):
    optimkit.Prodigy(_tiny(), weight_decay=0.1, decouple=True)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("kwargs,msg", [
    (dict(lr=-1.0), "lr=-1.0; expected 0 <= lr"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(betas=(1.0, 0.999)), "betas[0]=1.0"),
    (dict(betas=(0.9, -0.1)), "betas[1]=-0.1"),
    (dict(beta3=1.0), "beta3=1.0"),
    (dict(eps=0.0), "eps=0.0; expected 0 < eps"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(d0=0.0), "d0=0.0; expected 0 < d0"),
    (dict(d_coef=-1.0), "d_coef=-1.0"),
    (dict(growth_rate=0.9), "growth_rate=0.9; expected 1 <= growth_rate"),
    (dict(slice_p=0), "slice_p=0"),
    (dict(slice_p=2.5), "slice_p=2.5"),
    (dict(decouple=1), "decouple=1"),
    (dict(nonfinite="ignore"), "nonfinite='ignore'"),
])
def test_invalid_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError) as e:
        optimkit.Prodigy(_tiny(), **kwargs)
    assert str(e.value).startswith("Prodigy: invalid") and msg in str(e.value)


# ------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("slice_p,where,value", [(1, 4, float("nan")), (3, 4, float("inf")),
                                                  (3, 1, float("nan"))])  # 1 is outside [::3]
@pytest.mark.parametrize("first_step", [False, True])
def test_nonfinite_gradient_raises_and_changes_nothing(foreach, slice_p, where, value, first_step):
    ps = _tiny(zero=True)
    opt = optimkit.Prodigy([{"params": ps[:2]}, {"params": ps[2:]}], foreach=foreach, slice_p=slice_p)
    for t in range(0 if first_step else 4):
        _grads(ps, t)
        opt.step()
    _grads(ps, 9, nan_at=(4, where, value))  # group 1, parameter 2, shape (11,)
    before = (copy.deepcopy([p.detach() for p in ps]),
              copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps) if p in opt.state}),
              copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))
    with pytest.raises(NonFiniteStepError, match=r"param group 1, parameter 2, shape \(11,\)"):
        opt.step()
    after = ([p.detach() for p in ps], {i: dict(opt.state[p]) for i, p in enumerate(ps) if p in opt.state},
             [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    assert_bitwise(before, after)


@pytest.mark.parametrize("foreach", [True, False])
def test_nonfinite_skip_mode_equals_not_taking_the_step(foreach):
    runs = []
    for bad in (True, False):
        ps = _tiny()
        opt = optimkit.Prodigy(ps, foreach=foreach, nonfinite="skip")
        for t in range(10):
            if t == 5:
                if not bad:
                    continue
                _grads(ps, t, nan_at=(0, 3, float("nan")))
                with pytest.warns(RuntimeWarning, match="non-finite"):
                    opt.step()
                continue
            _grads(ps, t)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert oa.param_groups[0]["skipped_steps"] == 1 and ob.param_groups[0]["skipped_steps"] == 0
    assert math.isfinite(oa.param_groups[0]["d"]) and oa.param_groups[0]["d"] == ob.param_groups[0]["d"]
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_prodigyopt_is_poisoned_by_one_nan():
    # The fault we guard against: after one NaN gradient prodigyopt's d statistics stay NaN.
    ps = _tiny()
    opt = ref_opt(ps)
    for t in range(6):
        _grads(ps, t, nan_at=(0, 3, float("nan")) if t == 2 else None)
        opt.step()
    assert math.isnan(float(opt.param_groups[0]["d_numerator"]))


# ------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_float32(dtype):
    # Oracle: prodigyopt in float32 fed the low-precision values, upcast, every step.
    kw = dict(weight_decay=0.01, d0=1e-3)  # a d0 whose steps are visible in 8-bit mantissas
    ps = _tiny(dtype)
    opt = optimkit.Prodigy(ps, **kw)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in ps]
    ref = ref_opt(shadow, **kw)
    for t in range(8):
        _grads(ps, t)
        for s, p in zip(shadow, ps):
            s.data.copy_(p.detach().float())
            s.grad = p.grad.float()
        opt.step()
        ref.step()
        assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-6)
        for p, s in zip(ps, shadow):
            assert torch.equal(p.detach(), s.detach().to(dtype))  # one rounding of the f32 result
            for k in ("s", "exp_avg", "exp_avg_sq"):
                assert opt.state[p][k].dtype == torch.float32
                torch.testing.assert_close(opt.state[p][k], ref.state[s][k], rtol=1e-6, atol=1e-12)
    assert opt.param_groups[0]["d"] > 2e-3


def test_bf16_default_d0_needs_stochastic_rounding_to_start():
    # With d0=1e-6 the first steps are far below bf16's resolution: rounded to nearest the
    # parameters never leave p0, r stays 0 and d never grows. Stochastic rounding moves them.
    ds = {}
    for sr in (False, True):
        torch.manual_seed(0)
        ps = _tiny(torch.bfloat16)
        opt = optimkit.Prodigy(ps, stochastic_rounding=sr)
        for t in range(30):
            _grads(ps, t)
            opt.step()
        ds[sr] = opt.param_groups[0]["d"]
    assert ds[False] == 1e-6 and ds[True] > 1e-5


def test_low_precision_state_dict_keeps_float32_state():
    ps = _tiny(torch.bfloat16)
    opt = optimkit.Prodigy(ps)
    for t in range(3):
        _grads(ps, t)
        opt.step()
    opt2 = optimkit.Prodigy([torch.nn.Parameter(p.detach().clone()) for p in ps])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for a, b in zip(ps, opt2.param_groups[0]["params"]):
        for k, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert_bitwise(v, opt2.state[b][k], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    # 40000 identical elements take the same sub-ulp step: each is one independent trial.
    n = 40000
    torch.manual_seed(0)
    target = None
    means = {}
    one = torch.tensor(1.0, dtype=dtype)
    ulp = 1.0 - torch.nextafter(one, torch.tensor(0.0, dtype=dtype)).item()  # spacing below 1
    for sr in (True, False):
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        # the first step is about 3.16e-6 * lr: pick lr for a step of 0.4 ulp below 1.0
        lr = 0.4 * ulp / 3.16e-6
        opt = optimkit.Prodigy([p], lr=lr, stochastic_rounding=sr)
        shadow = torch.nn.Parameter(torch.ones(n))
        ref = ref_opt([shadow], lr=lr)
        p.grad = torch.full((n,), 0.5, dtype=dtype)
        shadow.grad = p.grad.float()
        opt.step()
        ref.step()
        target = shadow.detach()[0].item()
        means[sr] = p.detach().double().mean().item()
    step = 1.0 - target
    assert 0.1 * ulp < step < 0.9 * ulp  # a sub-ulp step: round-to-nearest cannot represent it
    sigma = ulp * 0.5 / math.sqrt(n)
    assert abs(means[True] - target) < 5 * sigma
    assert abs(means[False] - target) > 50 * sigma  # nearest rounding is biased here


# ------------------------------------------------------------------- fused fast path
_FAST_GRID = [dict(decouple=dec, weight_decay=wd, use_bias_correction=ubc, slice_p=sp)
              for dec in (True, False) for wd in (0.0, 0.1) for ubc in (False, True) for sp in (1, 3)]


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    """max |a - b| <= rel * max |b|: float32 rounding relative to the tensor's scale."""
    if b.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rel * scale + 1e-30, f"{what}: max abs error {err:.3e} > {rel} * {scale:.3e}"


@pytest.mark.parametrize("kw", _FAST_GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_fast_path_matches_reference_float32(monkeypatch, kw):
    """The float32 fast path (torch's fused Adam kernel with grad_scale=1/d for phase 2,
    batched/pieced statistics for phase 1) against the per-tensor reference, 120 steps of the
    harness model in float32. Teacher-forced: before every step the fast optimizer gets the
    reference's parameters and state, so each step is compared from the same point. Float32
    training with coupled decay is chaotic here (the float32 reference itself drifts ~100%
    from float64 over 120 steps), so free-running trajectories would compare rounding noise
    amplification, not the update. Tolerance: 1e-5 of each tensor's scale (float32 rounding
    of a different but equivalent order of operations). With use_bias_correction the chunk
    budget is cut to 2 KiB, so the large-tensor pieces (>32 elements) and several small-tensor
    runs are exercised too.
    """
    import optimkit.optimizers._prodigy.foreach as foreach_mod
    import optimkit.optimizers._prodigy.paths as paths_mod

    calls = {"fused": 0}
    orig = paths_mod.prodigy_apply_fused

    def counting(*a, **k):
        calls["fused"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(paths_mod, "prodigy_apply_fused", counting)
    if kw["use_bias_correction"]:
        monkeypatch.setitem(foreach_mod._CHUNK_BYTES, "cpu", 2048)
    x, y = _digits()
    net_ref, net_fast = Net(torch.float32), Net(torch.float32)
    ref = optimkit.Prodigy(net_ref.groups("two", {}), foreach=False, **kw)
    fast = optimkit.Prodigy(net_fast.groups("two", {}), foreach=True, **kw)
    gen = torch.Generator().manual_seed(1)
    for t in range(120):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        ref.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net_ref(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for a, b in zip(net_fast.parameters(), net_ref.parameters()):
                a.copy_(b)
                a.grad = b.grad.clone()
        sd = copy.deepcopy(ref.state_dict())  # torch would share same-dtype state tensors
        for g in sd["param_groups"]:
            g["foreach"] = True  # the flag travels in the state_dict: keep the fast path
        fast.load_state_dict(sd)
        ref.step()
        fast.step()
        ga, gb = fast.param_groups[0], ref.param_groups[0]
        assert ga["k"] == gb["k"]
        for key in ("d", "d_denom", "d_max"):
            assert float(ga[key]) == pytest.approx(float(gb[key]), rel=1e-5), f"step {t} {key}"
        for (name, a), b in zip(net_fast.named_parameters(), net_ref.parameters()):
            _rel_close(a.detach(), b.detach(), 1e-5, f"step {t} param {name}")
            sa, sb = fast.state[a], ref.state[b]
            assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
            for k in ("s", "p0", "exp_avg", "exp_avg_sq"):
                assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype
                _rel_close(sa[k], sb[k], 1e-5, f"step {t} state {name}[{k}]")
    assert ref.param_groups[0]["d"] > 100 * ref.param_groups[0]["d0"]  # d moved: not vacuous
    assert calls["fused"] >= 2 * 100  # the fused path ran (two groups; early steps may not)


def test_fused_fast_path_only_for_float32_cpu_with_beta1():
    """float64 (prodigyopt parity to 1e-10), beta1 == 0 (no exp_avg), low precision (float32
    state) and the reference implementation keep the existing paths."""
    for dtype, kw, want in ((torch.float32, {}, True), (torch.float64, {}, False),
                            (torch.float32, dict(betas=(0.0, 0.99)), False),
                            (torch.bfloat16, {}, False), (torch.float32, dict(foreach=False), False)):
        ps = _tiny(dtype)
        opt = optimkit.Prodigy(ps, **kw)
        _grads(ps, 0)
        opt.step()
        work = opt._gather(0, opt.param_groups[0])
        work.states = [opt.state[p] for p in work.params]
        assert opt._fast(work, opt.param_groups[0]["betas"][0]) is want, (dtype, kw)


def test_fused_fast_path_small_tensor_runs_and_pieces_agree():
    """Many small tensors (batched runs) and tensors cut into pieces give the reference's
    statistics: d, d_numerator and d_denom after 5 steps to float32 rounding."""
    import optimkit.optimizers._prodigy.foreach as prodigy_mod  # holds the chunk budget

    shapes = [(37,)] * 50 + [(300, 7), (1,), (0,), (33, 33)] + [(5, 3)] * 20
    runs = []
    for foreach in (False, True):
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(shapes)]
        ps[1].data.zero_()  # a 0-dim p0 inside a run of small tensors
        opt = optimkit.Prodigy(ps, foreach=foreach, weight_decay=0.05, decouple=False)
        old = prodigy_mod._CHUNK_BYTES.get("cpu")
        prodigy_mod._CHUNK_BYTES["cpu"] = 4096  # pieces of 512 elements, runs up to 1024
        try:
            for t in range(5):
                gg = torch.Generator().manual_seed(50 + t)
                for p in ps:
                    p.grad = (p.detach() - 1.0) + 0.1 * torch.randn(p.shape, generator=gg)
                opt.step()
        finally:
            prodigy_mod._CHUNK_BYTES["cpu"] = old
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for key in ("d", "d_numerator", "d_denom"):
        assert oa.param_groups[0][key] == pytest.approx(ob.param_groups[0][key], rel=1e-5), key
    assert oa.param_groups[0]["d"] > 1e-5
    for a, b in zip(pa, pb):
        _rel_close(b.detach(), a.detach(), 1e-5, "param")


def test_fused_fast_path_probe_overflow_is_rechecked_exactly(monkeypatch):
    """The fast path bounds max |g| by ||g_piece||_2, whose float32 square overflows for
    gradients near 1e19 although every sum, and the step, are finite. Such a step must not be
    refused as non-finite: the exact max is taken on the host and the step equals the
    reference's (to float32 rounding)."""
    import optimkit.optimizers._prodigy.foreach as foreach_mod
    import optimkit.optimizers.prodigy as prodigy_mod

    monkeypatch.setitem(foreach_mod._CHUNK_BYTES, "cpu", 4096)  # pieces of 512 elements
    exact = {"n": 0}
    orig = prodigy_mod.Prodigy._exact_gmax

    def counting(self, e):
        exact["n"] += 1
        return orig(self, e)

    monkeypatch.setattr(prodigy_mod.Prodigy, "_exact_gmax", counting)
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(3000, generator=gen)
    runs = []
    for foreach in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = optimkit.Prodigy([p], foreach=foreach)
        for t in range(3):
            p.grad = torch.randn(3000, generator=torch.Generator().manual_seed(10 + t)) * 1e19
            opt.step()
        runs.append((p.detach().clone(), opt.param_groups[0]["d"]))
    (pa, da), (pb, db) = runs
    assert exact["n"] >= 1  # the bound overflowed and was replaced by the exact max
    assert db == pytest.approx(da, rel=1e-5)
    assert torch.isfinite(pb).all() and not torch.equal(pb, init)
    _rel_close(pb, pa, 1e-5, "param")


@pytest.mark.parametrize("c_s", [1e-8, 3e-7, 1e-3, 1.0, 7.5, 1e-9])
def test_fused_fast_path_s_update_is_bitwise_the_literal_one(c_s):
    """Phase 2 of the fast path updates s through the fused SGD kernel's momentum buffer
    (c_s >= 1e-8; below it the two multi-tensor ops): s' = beta3 s + c_s g as
    ``s.mul_(beta3).add_(g, alpha=c_s)`` computes it, bitwise in the kernel's vectorised body
    and within one float32 ulp of the larger operand in its scalar tail (the last < 16
    elements of a tensor), and
    p.grad is untouched."""
    from optimkit.optimizers._prodigy.fused import prodigy_apply_fused

    gen = torch.Generator().manual_seed(5)
    shapes = [(37,), (300, 7), (1,), (33, 33)]
    ps = [torch.randn(sh, generator=gen) for sh in shapes]
    gs = [torch.randn(sh, generator=gen) for sh in shapes]
    ss = [torch.randn(sh, generator=gen).reshape(-1) * (0 if i == 0 else 1)
          for i, sh in enumerate(shapes)]
    ms = [torch.zeros(sh) for sh in shapes]
    vs = [torch.zeros(sh) for sh in shapes]
    want = [x.clone().mul_(0.999).add_(g.reshape(-1), alpha=c_s) for x, g in zip(ss, gs)]
    g_before = [g.clone() for g in gs]
    s_before = [x.clone() for x in ss]
    prodigy_apply_fused(ps, gs, ss, ms, vs, slice_p=1, beta3=0.999, c_s=c_s, coupled_wd=0.0,
                        beta1=0.9, beta2=0.999, d=1e-3, d_new=1e-3, dlr=1e-3, eps=1e-8,
                        decoupled_wd=0.0, scratch=torch.empty(4096))
    for got, w, x, g in zip(ss, want, s_before, gs):
        # one rounding of the larger operand (the result itself can be smaller: cancellation)
        big = torch.maximum((0.999 * x).abs(), (c_s * g.reshape(-1)).abs())
        ulp = torch.nextafter(big, torch.tensor(float("inf"))) - big
        assert ((got - w).abs() <= ulp).all()
        body = (w.numel() // 16) * 16  # the vectorised part: bitwise
        assert torch.equal(got[:body], w[:body])
    for g, g0 in zip(gs, g_before):
        assert torch.equal(g, g0)


# ====================================================================== robustness (issue 11)
def _snap(opt, params) -> Any:
    """Everything a failed call must leave untouched, for a bitwise comparison: parameters,
    every state entry (cloned), every group value but params, torch's RNG, and the stochastic
    rounding generators."""
    rng = opt._rounding_rng
    return (
        [p.detach().clone() for p in params],
        {i: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
             for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state},
        len(opt.state),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        torch.get_rng_state(),
        rng.state_dict() if rng is not None else None,
    )


#: the implementations every robustness test runs: the per-tensor reference, the multi-tensor
#: path (float64), the float32 fast path (fused phase 2), flat buffers, a bfloat16 state
IMPLS = {
    "reference": (dict(foreach=False), torch.float64),
    "foreach": (dict(foreach=True), torch.float64),
    "fused": (dict(), torch.float32),
    "flat": (dict(flat=True), torch.float32),
    "state_bf16": (dict(state_dtype=torch.bfloat16), torch.float32),
}


def _net_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (), (4, 3), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
            for s in shapes]


# ------------------------------------------------------------------------- empty groups
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", ["first", "middle", "last", "two"])
def test_empty_param_groups_anywhere_change_nothing(impl, layout):
    """Empty groups (group 0 included: ZeRO gives a rank an empty share of a group) step
    exactly as the same optimizer without them, bitwise."""
    kw, dtype = IMPLS[impl]
    runs = []
    for with_empty in (False, True):
        torch.manual_seed(0)
        ps = _net_params(dtype)
        groups = [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.1}]
        if with_empty:
            e = {"params": []}
            groups = {"first": [e, *groups], "middle": [groups[0], e, groups[1]],
                      "last": [*groups, e], "two": [e, groups[0], dict(e), groups[1]]}[layout]
        opt = optimkit.Prodigy(groups, **kw)
        for t in range(6):
            _grads(ps, t)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob.param_groups[-1]["d"] == oa.param_groups[0]["d"] > 1e-6
    for a, b in zip(pa, pb):
        assert_bitwise(a.detach(), b.detach())
        assert_bitwise(oa.state[a], ob.state[b])


def test_all_groups_empty_steps_as_a_no_op():
    for groups in ([{"params": []}], [{"params": []}, {"params": [], "lr": 0.0}]):
        opt = optimkit.Prodigy(groups)
        before = _snap(opt, [])
        opt.step()
        opt.step()
        assert_bitwise(before, _snap(opt, []))


def test_empty_first_group_compiled():
    # compile=True with group 0 empty (float32, the compiled kernels are shared per process)
    runs = []
    for groups_of in (lambda ps: [{"params": ps}], lambda ps: [{"params": []}, {"params": ps}]):
        ps = _net_params(torch.float32)
        opt = optimkit.Prodigy(groups_of(ps), compile=True)
        for t in range(3):
            _grads(ps, t)
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        assert_bitwise(a.detach(), b.detach())


# ------------------------------------------------------------------- hyperparameter types
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tensor_hyperparameters_step_as_floats(impl):
    """0-dim and 1-element tensors are accepted where torch.optim accepts them (betas, lr, ...)
    and step exactly as the same Python floats, in every path."""
    kw, dtype = IMPLS[impl]

    def T(x):  # float64: the same value as the Python float (a float32 tensor rounds it)
        return torch.tensor(x, dtype=torch.float64)

    tensor_kw = dict(betas=(T([0.9]), T(0.99)), lr=T(1.0), eps=T([1e-8]), weight_decay=T(0.01),
                     d0=T(1e-6), d_coef=T([1.0]), beta3=T(0.995), growth_rate=T(1.5))
    float_kw = dict(betas=(0.9, 0.99), lr=1.0, eps=1e-8, weight_decay=0.01, d0=1e-6, d_coef=1.0,
                    beta3=0.995, growth_rate=1.5)
    runs = []
    for hp in (float_kw, tensor_kw):
        torch.manual_seed(0)
        ps = _net_params(dtype)
        opt = optimkit.Prodigy(ps, use_bias_correction=True, **hp, **kw)
        for t in range(6):
            _grads(ps, t)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert oa.param_groups[0]["d"] == ob.param_groups[0]["d"] > 1e-6
    assert isinstance(ob.param_groups[0]["d"], float)
    assert ob.param_groups[0]["effective_lr"] == oa.param_groups[0]["effective_lr"]
    for a, b in zip(pa, pb):
        assert_bitwise(a.detach(), b.detach())
        assert_bitwise(oa.state[a], ob.state[b])


def test_tensor_betas_compiled():
    runs = []
    for betas in ((0.9, 0.999), (torch.tensor([0.9]), torch.tensor(0.999))):
        ps = _net_params(torch.float32)
        opt = optimkit.Prodigy(ps, betas=betas, compile=True)
        for t in range(3):
            _grads(ps, t)
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        assert_bitwise(a.detach(), b.detach())


#: (argument, values that are valid for it among the probes)
_PROBES = {"nan": math.nan, "inf": math.inf, "-1": -1.0, "1e300": 1e300, "str": "0.1",
           "None": None, "list": [0.5, 0.5], "tensor2": torch.tensor([0.5, 0.5]), "bool": True}
_VALID = {
    "lr": {"1e300"}, "betas": {"list"}, "beta3": {"None"}, "eps": {"1e300"},
    "weight_decay": {"1e300"}, "decouple": {"bool"}, "use_bias_correction": {"bool"},
    "safeguard_warmup": {"bool"}, "d0": {"1e300"}, "d_coef": {"1e300"},
    "growth_rate": {"inf", "1e300"}, "fsdp_in_use": {"bool"}, "slice_p": set(),
    "strict_growth": {"bool"}, "nonfinite": set(), "stochastic_rounding": {"bool"},
    "foreach": {"None", "bool"}, "state_dtype": {"None"}, "flat": {"bool"},
    "compile": {"bool"}, "independent_ranks": {"bool"},
}


@pytest.mark.parametrize("arg", list(_VALID))
@pytest.mark.parametrize("probe", list(_PROBES))
def test_every_argument_refuses_bad_values_by_name(arg, probe):
    """Every constructor argument, probed with nan, inf, -1, 1e300, a string, None, a list, a
    2-element tensor and a bool: accepted where valid, else ValueError/TypeError naming
    Prodigy, the argument and the value, never an error from inside."""
    p = torch.nn.Parameter(torch.ones(3))
    value = _PROBES[probe]
    if probe in _VALID[arg]:
        optimkit.Prodigy([p], **{arg: value})
        return
    with pytest.raises((ValueError, TypeError)) as e:
        optimkit.Prodigy([p], **{arg: value})
    msg = str(e.value)
    assert msg.startswith("Prodigy: invalid ") and arg in msg, msg


@pytest.mark.parametrize("arg,value", [("lr", -1.0), ("betas", (1.0, 0.9)), ("beta3", 1.0),
                                       ("eps", 0.0), ("weight_decay", -1.0), ("d0", 0.0),
                                       ("d_coef", 0.0), ("growth_rate", 0.5), ("slice_p", 0),
                                       ("slice_p", 2**64)])
def test_documented_range_is_the_checked_range(arg, value):
    """The range each error states is the one the docstring documents (eps: 0 < eps < inf;
    slice_p: a huge int would overflow inside torch's slicing)."""
    with pytest.raises(ValueError) as e:
        optimkit.Prodigy([torch.nn.Parameter(torch.ones(2))], **{arg: value})
    expected = str(e.value).split("; expected ")[1].removeprefix("an int in ")
    doc = " ".join(optimkit.Prodigy.__doc__.split())
    assert f"``{expected}``" in doc, (arg, expected)


def test_hyperparameter_changed_after_construction_is_refused_before_any_write():
    ps = _net_params(torch.float32)
    opt = optimkit.Prodigy(ps, state_dtype=torch.bfloat16)
    for t in range(2):
        _grads(ps, t)
        opt.step()
    for key, bad in (("betas", (torch.tensor([0.9, 0.9]), 0.999)), ("betas", "x"),
                     ("eps", float("nan")), ("lr", "1"), ("slice_p", 2.0), ("weight_decay", -1)):
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        _grads(ps, 5)
        before = _snap(opt, ps)
        with pytest.raises(ValueError, match=f"Prodigy: invalid {key}"):
            opt.step()
        assert_bitwise(before, _snap(opt, ps))
        opt.param_groups[0][key] = good
    opt.step()  # and it steps afterwards
    assert opt.param_groups[0]["k"] == 3


# ----------------------------------------------------------------------- atomic step()
def _failing_setups():
    """(name, build(ps) -> opt, break(opt, ps) applied before the failing step, error)."""
    def sparse(opt, ps):
        ps[4].grad = ps[4].grad.to_sparse()

    def shape(opt, ps):  # torch refuses the assignment; through .data it goes in
        ps[3].grad.data = torch.zeros(3, 4, dtype=ps[3].dtype)

    def mixed_lr(opt, ps):
        opt.param_groups[1]["lr"] = 0.5

    def nan(opt, ps):
        ps[3].grad[1, 1] = float("nan")

    def huge(opt, ps):  # max|g| * d past sqrt(float32 max): exp_avg_sq would overflow
        ps[0].grad[0, 0] = 1e35

    def nothing(opt, ps):
        pass

    return [
        ("sparse gradient", {}, sparse, RuntimeError, "sparse"),
        ("gradient shape", {}, shape, RuntimeError, "gradient shape"),
        ("lr not max-or-0", {}, mixed_lr, ValueError, "lr values"),
        ("NaN gradient", {}, nan, NonFiniteStepError, "non-finite"),
        ("exp_avg_sq overflow", {}, huge, NonFiniteStepError, "exp_avg_sq would overflow"),
        ("weight_decay 1e300", dict(weight_decay=1e300), nothing, NonFiniteStepError,
         "weight_decay \\* dlr"),
        ("d0 1e-40 float32", dict(d0=1e-40), nothing, NonFiniteStepError, "d \\* eps"),
    ]


@pytest.mark.parametrize("impl", ["reference", "fused", "flat", "state_bf16"])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("setup", range(len(_failing_setups())),
                         ids=[s[0] for s in _failing_setups()])
def test_failed_step_leaves_everything_bitwise_unchanged(impl, first_step, setup):
    """A step that raises, whatever the reason, leaves parameters, state (p0, s, exp_avg,
    exp_avg_sq, step), group values (d, d_max, d_numerator, d_hat, d_denom, k, effective_lr,
    skipped_steps) and torch's RNG exactly as they were (stochastic rounding on, so the RNG
    would show any phase-2 work), and the optimizer steps normally afterwards."""
    name, extra, breaks, err, match = _failing_setups()[setup]
    kw, _ = IMPLS[impl]
    ps = _net_params(torch.float32)
    if impl == "state_bf16":
        ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in ps]
        kw = dict(kw, stochastic_rounding=True)
    opt = optimkit.Prodigy([{"params": ps[:3]}, {"params": ps[3:]}], **kw, **extra)
    if not first_step and name not in ("weight_decay 1e300", "d0 1e-40 float32"):
        for t in range(3):
            _grads(ps, t)
            opt.step()
    _grads(ps, 7)
    breaks(opt, ps)
    before = _snap(opt, ps)
    with pytest.raises(err, match=match):
        opt.step()
    assert_bitwise(before, _snap(opt, ps))
    if name in ("weight_decay 1e300", "d0 1e-40 float32"):
        return  # refused on every step by design
    if name == "lr not max-or-0":
        opt.param_groups[1]["lr"] = 1.0
    _grads(ps, 8)
    opt.step()
    assert opt.param_groups[0]["k"] == (1 if first_step else 4)


def test_failed_step_compiled():
    ps = _net_params(torch.float32)
    opt = optimkit.Prodigy(ps, compile=True, flat=True)
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    ps[0].grad[0, 0] = 1e35
    before = _snap(opt, ps)
    with pytest.raises(NonFiniteStepError, match="exp_avg_sq would overflow"):
        opt.step()
    assert_bitwise(before, _snap(opt, ps))


def test_failed_step_skip_mode_counts_and_changes_nothing_else():
    ps = _net_params(torch.float32)
    opt = optimkit.Prodigy(ps, nonfinite="skip")
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    ps[0].grad[0, 0] = 1e35
    before = _snap(opt, ps)
    with pytest.warns(RuntimeWarning, match="exp_avg_sq would overflow"):
        opt.step()
    after = _snap(opt, ps)
    for g in before[3]:
        g["skipped_steps"] += 1
    assert_bitwise(before, after)


def test_outputs_that_would_overflow_are_caught_where_prodigyopt_writes_inf():
    """The inputs are finite; prodigyopt's outputs are not. Each is refused here."""
    cases = [
        (dict(d0=1.0), lambda ps: ps[0].grad.mul_(1e22), "exp_avg_sq"),  # v = d^2 g^2 > 3.4e38
        (dict(weight_decay=1e300), lambda ps: None, "exp_avg_sq"),  # wd * dlr * p overflows
        (dict(d0=1e-40), lambda ps: None, "exp_avg"),  # d * eps underflows: 0/0 in the step
    ]
    for kw, scale, key in cases:
        ref_ps, ps = _net_params(torch.float32), _net_params(torch.float32)
        ref, ours = ref_opt(ref_ps, **kw), optimkit.Prodigy(ps, **kw)
        try:
            for t in range(2):
                _grads(ref_ps, t)
                scale(ref_ps)
                ref.step()
            bad = [not torch.isfinite(p).all() or not torch.isfinite(ref.state[p][k]).all()
                   for p in ref_ps for k in ("exp_avg", "exp_avg_sq") if p.numel()]
        except RuntimeError:  # "value cannot be converted to type float without overflow"
            bad = [True]  # ... half-way through its step
        assert any(bad), kw  # prodigyopt wrote inf/NaN or raised half-way
        _grads(ps, 0)
        scale(ps)
        before = _snap(ours, ps)
        with pytest.raises(NonFiniteStepError):
            ours.step()
        assert_bitwise(before, _snap(ours, ps))


def test_output_checks_do_not_refuse_float64_that_fits():
    # the same tiny d0 is fine in float64 (d * eps = 1e-48 is a normal float64)
    ps = _net_params(torch.float64)
    opt = optimkit.Prodigy(ps, d0=1e-40)
    for t in range(20):
        _grads(ps, t)
        opt.step()
    # (d stays at d0: steps of 1e-40 do not move parameters of size ~1, as in prodigyopt)
    assert opt.param_groups[0]["k"] == 20 and all(torch.isfinite(p).all() for p in ps)


def test_d_update_overflow_is_refused():
    ps = _net_params(torch.float64)
    opt = optimkit.Prodigy(ps, d_coef=1e308)
    with pytest.raises(NonFiniteStepError, match="the d update gives|overflows"):
        for t in range(10):
            _grads(ps, t)
            before = _snap(opt, ps)
            opt.step()
    assert_bitwise(before, _snap(opt, ps))
    assert all(math.isfinite(opt.param_groups[0][k]) for k in ("d", "d_max", "d_hat"))


# --------------------------------------------------------------- dtype after construction
@pytest.mark.parametrize("impl", ["reference", "fused", "flat", "state_bf16"])
@pytest.mark.parametrize("to", [torch.float64, torch.bfloat16, torch.float16])
def test_model_moved_to_another_dtype_trains_as_a_fresh_optimizer_with_recast_state(impl, to):
    """After model.double() / .bfloat16() / .half(), Prodigy keeps training exactly as a new
    optimizer over the moved model that loaded the old one's state_dict (which recasts the
    state: load_state_dict casts it to the parameters' dtype, float32 for float16/bfloat16)."""
    kw, _ = IMPLS[impl]
    model_a = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model_b = copy.deepcopy(model_a)
    opt_a = optimkit.Prodigy(model_a.parameters(), weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 4, generator=g) for _ in range(8)]

    def step(model, opt, x):
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).pow(2).mean().backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flat=True warns that its buffers dissolve
        for x in xs[:4]:
            step(model_a, opt_a, x)
        model_b.load_state_dict(model_a.state_dict())
        sd = copy.deepcopy(opt_a.state_dict())
        model_a.to(to)
        model_b.to(to)
        # flat=True: the moved parameters left the flat buffers and step one by one from
        # then on (docs/flat.md), as a per-tensor optimizer does
        opt_b = optimkit.Prodigy(model_b.parameters(), weight_decay=0.01,
                                 **{k: v for k, v in kw.items() if k != "flat"})
        opt_b.load_state_dict(sd)
        for x in xs[4:]:
            step(model_a, opt_a, x)
            step(model_b, opt_b, x)
    assert opt_a.param_groups[0]["d"] == opt_b.param_groups[0]["d"]
    assert opt_a.param_groups[0]["k"] == 8
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert pa.dtype == to
        assert_bitwise(pa.detach(), pb.detach())
        assert_bitwise(opt_a.state[pa], opt_b.state[pb])


# ------------------------------------------------------------------------ load_state_dict
def _trained(seed: int = 0, **kw):
    torch.manual_seed(seed)
    ps = _net_params(torch.float32, seed)
    ps[2].data.zero_()  # a 0-dim p0
    opt = optimkit.Prodigy([{"params": ps[:3]}, {"params": ps[3:]}],
                           state_dtype=torch.bfloat16, **kw)
    for t in range(3):
        _grads(ps, t + seed)
        opt.step()
    return ps, opt


def _group(key, value):
    return lambda sd: sd["param_groups"][1].__setitem__(key, value)


def _state(key, fn):
    def edit(sd):
        sd["state"][3][key] = fn(sd["state"][3][key])
    return edit


_BAD_LOADS = {
    "d str": (_group("d", "x"), "d='x'"),
    "d nan": (_group("d", math.nan), "d=nan"),
    "d zero": (_group("d", 0.0), "d=0.0"),
    "d negative": (_group("d", -1.0), "d=-1.0"),
    "d bool": (_group("d", True), "d=True"),
    "d 2-element tensor": (_group("d", torch.tensor([1.0, 2.0])), "d=tensor"),
    "d0 zero": (_group("d0", 0.0), "d0=0.0"),
    "d_max inf": (_group("d_max", math.inf), "d_max=inf"),
    "d_numerator nan": (_group("d_numerator", math.nan), "d_numerator=nan"),
    "d_hat inf": (_group("d_hat", -math.inf), "d_hat=-inf"),
    "d_denom nan": (_group("d_denom", math.nan), "d_denom=nan"),
    "k negative": (_group("k", -1), "k=-1"),
    "k fractional": (_group("k", 2.5), "k=2.5"),
    "k str": (_group("k", "3"), "k='3'"),
    "skipped_steps negative": (_group("skipped_steps", -1), "skipped_steps=-1"),
    "betas bad": (_group("betas", (0.9, 1.5)), "betas"),
    "step negative": (_state("step", lambda v: -1), "step"),
    "step fractional": (_state("step", lambda v: 1.5), "step"),
    "p0 shape": (_state("p0", lambda v: torch.zeros(5)), "'p0'"),
    "p0 int": (_state("p0", lambda v: v.long()), "'p0'"),
    "s shape": (_state("s", lambda v: torch.zeros(3)), "'s'"),
    "s int": (_state("s", lambda v: v.int()), "'s'"),
    "exp_avg nan": (_state("exp_avg", lambda v: v.float().fill_(math.nan)), "NaN"),
    "exp_avg_sq negative": (_state("exp_avg_sq", lambda v: -v.float() - 1), "negative"),
    "rng seed": (lambda sd: sd[RNG_KEY].__setitem__("seed", "x"), "seed"),
    "rng generator": (lambda sd: sd[RNG_KEY]["generators"].__setitem__(
        "cpu", torch.zeros(3, dtype=torch.uint8)), "generator"),
}


@pytest.mark.parametrize("case", list(_BAD_LOADS))
def test_rejected_load_changes_nothing(case):
    """Every check runs before anything is replaced: the state, the groups (d, k, ...), the
    stochastic-rounding generators. The checkpoint comes from another run (other values, and
    generators that have drawn), so a partial load would show."""
    edit, match = _BAD_LOADS[case]
    _, other = _trained(seed=1)
    sd = copy.deepcopy(other.state_dict())
    assert RNG_KEY in sd and sd[RNG_KEY]["generators"]
    edit(sd)
    ps, opt = _trained(seed=0)
    before = _snap(opt, ps)
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        opt.load_state_dict(sd)
    assert "Prodigy.load_state_dict" in str(e.value)
    assert_bitwise(before, _snap(opt, ps))
    _grads(ps, 9)
    opt.step()  # still usable
    assert opt.param_groups[0]["k"] == 4


@pytest.mark.parametrize("form", ["tensor", "float"])
def test_counts_and_scalars_load_in_every_integral_form(form):
    """k and step as integral floats or 0-dim tensors, d as a 0-dim tensor (prodigyopt under
    FSDP stores tensors): accepted, and the run continues exactly as from the plain values."""
    _, src = _trained(seed=1)
    sd = copy.deepcopy(src.state_dict())
    odd = copy.deepcopy(sd)
    for g in odd["param_groups"]:
        g["k"] = torch.tensor(g["k"]) if form == "tensor" else float(g["k"])
        g["d"] = torch.tensor(g["d"], dtype=torch.float64) if form == "tensor" else g["d"]
    for st in odd["state"].values():
        st["step"] = torch.tensor(float(st["step"])) if form == "tensor" else float(st["step"])
    runs = []
    for d in (sd, odd):
        ps, opt = _trained(seed=0)
        opt.load_state_dict(d)
        assert isinstance(opt.param_groups[0]["k"], int)
        assert isinstance(opt.param_groups[0]["d"], float)
        for t in range(3):
            _grads(ps, 10 + t)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert oa.param_groups[0]["d"] == ob.param_groups[0]["d"]
    for a, b in zip(pa, pb):
        assert_bitwise(a.detach(), b.detach())


def test_load_pre_hooks_run_before_the_checks():
    """torch's order: a register_load_state_dict_pre_hook may adapt an old checkpoint (here one
    whose d was written as a string) before anything is checked."""
    _, src = _trained(seed=1)
    sd = copy.deepcopy(src.state_dict())
    want = sd["param_groups"][0]["d"]
    for g in sd["param_groups"]:
        g["d"] = repr(g["d"])
    ps, opt = _trained(seed=0)

    def fix(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for g in state_dict["param_groups"]:
            g["d"] = float(g["d"])
        return state_dict

    opt.register_load_state_dict_pre_hook(fix)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["d"] == want


def test_rejected_load_leaves_rounding_generators_alone():
    # a checkpoint whose generators differ, refused for a bad d: the generators keep theirs
    _, src = _trained(seed=1)
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"][0]["d"] = "x"
    ps, opt = _trained(seed=0)
    gens = copy.deepcopy(opt._rounding_rng.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_bitwise(gens, opt._rounding_rng.state_dict())
