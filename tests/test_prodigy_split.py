"""Prodigy(split_groups=True): every param group estimates its own d.

The oracle is exact: one optimizer with ``split_groups`` over groups G1..Gn computes, bit for
bit, what n independent Prodigy optimizers (one per group) compute, in float64 over a few
hundred steps, with the options crossed (a covering set of rows) and on every path:
the reference (``foreach=False``), foreach, the float32 fused fast path, ``flat=True`` and
``compile=True``. The groups use LoRA+ style lrs (1 and 16) and their own d_coef.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import optimkit
from test_prodigy import Net, _digits, ref_opt, roundtrip

#: (constructor kwargs, lr warm-up) — every option appears, and the pairs that interact
ROWS = [
    (dict(), False),
    (dict(weight_decay=0.01, decouple=False, use_bias_correction=True, slice_p=3), False),
    (dict(weight_decay=0.02, safeguard_warmup=True, d_coef=2.0, growth_rate=1.05, beta3=0.9),
     True),
    (dict(betas=(0.0, 0.99), weight_decay=0.05, slice_p=11, d_coef=0.5, d0=1e-5), False),
    (dict(use_bias_correction=True, safeguard_warmup=True, decouple=False, weight_decay=1e-3),
     True),
]
STEPS = 200


def _groups(net: Net, kw: dict) -> list[dict]:
    """Four groups: the body, LoRA A (lr 1), LoRA B (lr 16: LoRA+), the head (own d_coef)."""
    return [
        {"params": [net.w1, net.b1, net.scale]},
        {"params": [net.lora_a], "lr": 1.0},
        {"params": [net.lora_b], "lr": 16.0},
        {"params": [net.w2, net.b2], "lr": 0.5, "d_coef": kw.get("d_coef", 1.0) * 3},
    ]


def _run(kw: dict, warmup: bool, impl: dict, *, dtype=torch.float64, steps: int = STEPS):
    """Train one net with a split optimizer and a copy with one optimizer per group, on the
    same gradients; compare bit for bit after every step."""
    x, y = _digits()
    net_a, net_b = Net(dtype), Net(dtype)
    split = optimkit.Prodigy(_groups(net_a, kw), split_groups=True, **kw, **impl)
    singles = [optimkit.Prodigy([g], **kw, **impl) for g in _groups(net_b, kw)]
    opts = [split, *singles]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 30))
              for o in opts] if warmup else []
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        for net in (net_a, net_b):
            net.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            if t == 50:
                net.w2.grad = None  # a parameter that loses its gradient for a step
            if 60 <= t < 65:
                net.lora_a.grad = None  # a whole group without gradients for a while
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        _assert_equal(net_a, split, net_b, singles, f"step {t}")
    return split, singles


def _assert_equal(net_a, split, net_b, singles, what):
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(pa, pb), f"{what}: param {name}"
        sa, sb = split.state.get(pa, {}), next((o.state[pb] for o in singles if pb in o.state), {})
        assert sa.keys() == sb.keys(), f"{what}: state keys of {name}"
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), f"{what}: state {name}[{k}]"
            else:
                assert sa[k] == sb[k], f"{what}: state {name}[{k}]"
    for gi, (ga, o) in enumerate(zip(split.param_groups, singles)):
        gb = o.param_groups[0]
        for key in ("d", "d_max", "d_numerator", "d_hat", "d_denom", "k", "lr", "effective_lr"):
            assert ga[key] == gb[key], f"{what}: group {gi} {key}: {ga[key]} != {gb[key]}"


@pytest.mark.parametrize("row,impl", [(0, "reference"), (1, "foreach"), (2, "reference"),
                                      (3, "foreach"), (4, "foreach")])
def test_split_groups_equal_one_prodigy_per_group_bitwise(row, impl):
    kw, warmup = ROWS[row]
    split, singles = _run(kw, warmup, dict(foreach=impl == "foreach"))
    ds = [g["d"] for g in split.param_groups]
    assert len(set(ds)) == len(ds), ds  # four different estimates: not vacuous
    assert all(d > 10 * kw.get("d0", 1e-6) for d in ds), ds


@pytest.mark.parametrize("row", [0, 2])
def test_split_groups_flat_bitwise(row):
    kw, warmup = ROWS[row]
    _run(kw, warmup, dict(flat=True), steps=120)


def test_split_groups_fused_fast_path_float32_bitwise():
    kw, warmup = ROWS[2]
    import optimkit.optimizers._prodigy.paths as paths

    calls = {"n": 0}
    orig = paths.prodigy_apply_fused

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    paths.prodigy_apply_fused = counting
    try:
        _run(kw, warmup, dict(foreach=True), dtype=torch.float32, steps=100)
    finally:
        paths.prodigy_apply_fused = orig
    assert calls["n"] > 100  # the fused kernel ran


def test_split_groups_compiled_bitwise():
    pytest.importorskip("torch._inductor")
    _run(dict(weight_decay=0.01), False, dict(compile=True), steps=15)


def test_split_groups_match_prodigyopt_per_group():
    """Each group of a split optimizer follows prodigyopt run on that group alone."""
    x, y = _digits()
    kw = dict(weight_decay=0.01, use_bias_correction=True)
    net_a, net_b = Net(), Net()
    split = optimkit.Prodigy(_groups(net_a, kw), split_groups=True, **kw)
    refs = [ref_opt([g], **kw) for g in _groups(net_b, kw)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        for net, opts in ((net_a, [split]), (net_b, refs)):
            net.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            for o in opts:
                o.step()
    for ga, o in zip(split.param_groups, refs):
        assert ga["d"] == pytest.approx(o.param_groups[0]["d"], rel=1e-10)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_lr_multiplies_the_groups_own_d():
    """LoRA+: lr 16 on B and 1 on A; each group's step multiplier is its own d x its lr."""
    split, _ = _run(dict(), False, dict(foreach=True), steps=20)
    for g in split.param_groups:
        assert g["effective_lr"] == g["d"] * g["lr"]


def test_without_split_groups_different_lrs_raise_and_name_split_groups():
    net = Net()
    with pytest.raises(ValueError, match=r"largest lr .* or 0.*split_groups=True"):
        optimkit.Prodigy(_groups(net, {}))
    with pytest.raises(ValueError, match="d_coef is global.*split_groups=True"):
        optimkit.Prodigy([{"params": [net.w1]}, {"params": [net.w2], "d_coef": 2.0}])
    with pytest.raises(ValueError, match="nonfinite is global"):
        optimkit.Prodigy([{"params": [net.w1]}, {"params": [net.w2], "nonfinite": "skip"}],
                         split_groups=True)


def test_late_group_starts_its_own_estimate_from_its_d0():
    net = Net()
    opt = optimkit.Prodigy([net.w1, net.b1], split_groups=True)
    x, y = _digits()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:64]), y[:64]).backward()
        opt.step()
    opt.add_param_group({"params": [net.w2, net.b2], "lr": 2.0, "d0": 1e-5})
    g = opt.param_groups[1]
    assert (g["d"], g["d_max"], g["k"], g["d_numerator"]) == (1e-5, 1e-5, 0, 0.0)
    assert opt.param_groups[0]["k"] == 5


def test_split_groups_state_dict_roundtrip_and_lookahead():
    """Resume mid-run (torch.save / weights_only load) continues bit for bit, and Lookahead
    over a split optimizer equals Lookahead over the same optimizer resumed."""
    kw = dict(weight_decay=0.01)
    x, y = _digits()

    def steps(net, opt, n, start):
        gen = torch.Generator().manual_seed(start)
        for _ in range(n):
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()

    for wrap in (False, True):
        def make(net):
            opt = optimkit.Prodigy(_groups(net, kw), split_groups=True, **kw)
            return optimkit.Lookahead(opt, k=3) if wrap else opt

        net = Net()
        opt = make(net)
        steps(net, opt, 20, 0)
        sd = roundtrip(opt.state_dict())
        net2 = copy.deepcopy(net)
        opt2 = make(net2)
        opt2.load_state_dict(sd)
        base2 = opt2.base if wrap else opt2
        assert [g["d"] for g in base2.param_groups] == [g["d"] for g in (
            opt.base if wrap else opt).param_groups]
        steps(net, opt, 20, 20)
        steps(net2, opt2, 20, 20)
        for pa, pb in zip(net.parameters(), net2.parameters()):
            assert torch.equal(pa, pb), wrap
        ds = [g["d"] for g in base2.param_groups]
        assert len(set(ds)) == 4


def test_split_groups_constructor_is_atomic_and_warns_nothing_for_lora_plus():
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimkit.Prodigy(_groups(net, {}), split_groups=True)
    with pytest.raises(ValueError, match="split_groups"):
        optimkit.Prodigy(net.parameters(), split_groups="yes")
