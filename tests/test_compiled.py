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
