"""compile=True: torch.compile-generated single-pass kernels (Adadelta, RMSprop).

The same 100-step parity runs as tests/test_parity_classic.py, against torch.optim: every
config in float64 at 1e-12 (the math is the same; inductor only fuses), and the last config in
float32 at 1e-4 relative / 1e-5 absolute (inductor evaluates the fused expression in another
order than torch's op-by-op path; measured worst case over the runs: 2.6e-3 relative on a
momentum-buffer element of 9e-6 absolute, i.e. float32 rounding carried through 100 steps).

Compiling needs a working inductor backend (a C++ compiler on CPU); where it has none the
module is skipped with the reason, and the rest of the suite covers everything else.
"""

from __future__ import annotations

import functools

import pytest
import torch

import harness
import optimkit
from optim_db import BY_NAME, config_id

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

NAMES = ("Adadelta", "RMSprop")


@functools.lru_cache(maxsize=None)
def _compile_error() -> str:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    try:
        torch.compile(f, dynamic=True)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure means "no backend here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


@pytest.fixture(autouse=True)
def _needs_compile():
    if _compile_error():
        pytest.skip(f"torch.compile unavailable on this machine ({_compile_error()})")


CASES = [pytest.param(BY_NAME[n], cfg, flat, id=f"{n}-{config_id(cfg)}-{'flat' if flat else 'tensors'}")
         for n in NAMES for cfg in BY_NAME[n].configs for flat in (True, False)]


@pytest.mark.parametrize("info,cfg,flat", CASES)
def test_compiled_matches_torch_float64(info, cfg, flat):
    ours = harness.run(lambda g: info.cls(g, **cfg, compile=True, flat=flat),
                       second=info.second_group)
    ref = harness.run(lambda g: info.oracle(g, **cfg, foreach=False), second=info.second_group)
    harness.assert_same_trajectory(*ours[:2], *ref[:2], **harness.tolerances(torch.float64))
    assert ours[2][-1] < ours[2][0] or cfg.get("maximize")


@pytest.mark.parametrize("name", NAMES)
def test_compiled_matches_torch_float32(name):
    info = BY_NAME[name]
    cfg = info.configs[-1]
    ours = harness.run(lambda g: info.cls(g, **cfg, compile=True, flat=True), dtype=torch.float32,
                       second=info.second_group)
    ref = harness.run(lambda g: info.oracle(g, **cfg, foreach=False), dtype=torch.float32,
                      second=info.second_group)
    harness.assert_same_trajectory(*ours[:2], *ref[:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_changing_lr_does_not_recompile(name):
    """Hyperparameters are kernel inputs: after the first steps, a scheduled lr and another
    tensor size run without compiling again."""
    info = BY_NAME[name]
    net, opt, _ = harness.run(lambda g: info.cls(g, **info.configs[0], compile=True, flat=True),
                              steps=3, events=False, second=info.second_group)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t))  # noqa: E731
    with torch._dynamo.config.patch(error_on_recompile=True):
        harness.run(None, net=net, opt=opt, start=3, steps=5, events=False, sched=sched)


def test_compile_is_refused_where_it_adds_nothing_or_conflicts():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match=r"compile"):  # Adam's default is torch's fused kernel
        optimkit.Adam(p, compile=True)
    with pytest.raises(ValueError, match=r"compile=True chooses the implementation"):
        optimkit.RMSprop(p, compile=True, foreach=True)
    with pytest.raises(ValueError, match=r"invalid compile='yes'; expected True or False"):
        optimkit.Adadelta(p, compile="yes")


# ----------------------------------------------------------------------------- Prodigy
def _prodigy_rows():
    from test_flat import FLAT_ROWS

    return FLAT_ROWS


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "tensors"])
@pytest.mark.parametrize("row", _prodigy_rows())
def test_prodigy_compiled_matches_prodigyopt_300_steps(row, flat):
    """Float64, 300 steps, against prodigyopt: the d sums are per tensor (or per bucket) in
    another summation order, so rounding-level agreement (1e-9), as for flat=True."""
    from test_prodigy import ROWS, ref_opt, train

    kw, layout, second, warmup = ROWS[row]
    run = dict(layout=layout, second=second, warmup=warmup)
    net_ref, opt_ref = train(lambda g: ref_opt(g, **kw), **run)
    net, opt = train(lambda g: optimkit.Prodigy(g, **kw, compile=True, flat=flat), **run)
    for (name, pa), pb in zip(net.named_parameters(), net_ref.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    for key in ("d", "d_max", "d_numerator", "d_hat"):
        assert float(opt.param_groups[0][key]) == pytest.approx(
            float(opt_ref.param_groups[0][key]), rel=1e-9), key


def test_prodigy_compiled_float32_is_as_accurate_as_the_default_path():
    """In float32 the d sums' rounding differs with the summation order and every step
    scales by d, so two float32 paths drift apart by ~3e-4 in 120 steps (measured); what must
    hold is that the compiled path is as close to the float64 trajectory as the default one."""
    from test_prodigy import ROWS, ref_opt, train

    kw, layout, second, warmup = ROWS[0]
    run = dict(layout=layout, second=second, warmup=warmup, steps=120)
    net_64, _ = train(lambda g: ref_opt(g, **kw), **run)
    net_a, _ = train(lambda g: optimkit.Prodigy(g, **kw), dtype=torch.float32, **run)
    net_b, _ = train(lambda g: optimkit.Prodigy(g, **kw, compile=True, flat=True),
                     dtype=torch.float32, **run)

    def err(net):
        return max((p.double() - q).abs().max().item()
                   for p, q in zip(net.parameters(), net_64.parameters()))

    e_default, e_compiled = err(net_a), err(net_b)
    assert e_compiled <= 2 * e_default + 1e-5, (e_compiled, e_default)


def test_prodigy_compiled_does_not_recompile_as_d_grows():
    from test_prodigy import train

    net, opt = train(lambda g: optimkit.Prodigy(g, compile=True, flat=True), steps=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(None, net=net, opt=opt, start=3, steps=30)
    assert opt.param_groups[0]["d"] > 1e-6


# ----------------------------------------------------------------------------- compile options
def _axpy(x: torch.Tensor, y: torch.Tensor, hp: torch.Tensor) -> None:
    y.copy_(y + hp[0] * x)


def test_a_failed_compile_retries_with_inductors_defaults(monkeypatch):
    """optimkit compiles with OPTIONS (the compiler's ISA probe skipped); if a compile with
    them fails, the kernel recompiles with inductor's defaults, once, and runs correctly.
    A compiler that does not exist stands in for one that cannot build the SIMD headers."""
    from optimkit import _compiled

    monkeypatch.setattr(_compiled, "OPTIONS", {**_compiled.OPTIONS,
                                               "cpp.cxx": (None, "/nonexistent/optimkit-c++")})
    monkeypatch.setattr(_compiled, "_KERNELS", {})
    k = _compiled.kernel(_axpy)
    first = k.call
    x, y = torch.arange(5.0), torch.ones(5)
    k(x, y, torch.tensor([2.0]))
    assert k.call is not first  # the compile with OPTIONS failed and was replaced
    torch.testing.assert_close(y, 1 + 2 * torch.arange(5.0))
    assert k.proven and _compiled.kernel(_axpy) is k
    k(x, y, torch.tensor([1.0]))  # the fallback compiled once; this call only runs it
    torch.testing.assert_close(y, 1 + 3 * torch.arange(5.0))


def test_the_options_do_not_change_the_users_compile_config():
    """OPTIONS apply while optimkit's kernels compile, not to inductor's global config."""
    from torch._inductor import config

    before = config.cpp.vec_isa_ok
    from optimkit import _compiled

    _compiled.kernel(_axpy)(torch.arange(3.0), torch.ones(3), torch.tensor([1.0]))
    assert config.cpp.vec_isa_ok == before


def test_parameter_shapes_do_not_recompile():
    """The kernels see detached 1-D aliases with no view base, so a parameter's shape (or
    dimensionality) is not part of the compiled graph's guards: new shapes reuse it. Float64:
    inductor's float32 sums also specialise on size > 4096 (a second graph, by design)."""
    def run(shapes, flat):
        for make in (lambda ps: optimkit.Prodigy(ps, lr=1.0, compile=True, flat=flat),
                     lambda ps: optimkit.RMSprop(ps, lr=1e-3, momentum=0.9, compile=True,
                                                 flat=flat)):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p)
            make(ps).step()

    torch._dynamo.reset()  # this test's first call compiles, whatever ran before it
    run([(30,)], False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run([(7, 11, 13), (300,), (2, 5), (64, 3)], False)
        run([(9, 9), (17,)], True)
