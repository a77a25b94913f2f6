"""``torch.compile(opt.step)``: every registry optimizer, on its default path, compiled.

The recipe torch documents for its own optimizers (``torch.compile(opt.step)``, or a compiled
function that calls ``opt.step()``, ``fullgraph=False``) must run every optimkit optimizer and
give the eager step's result. Each case steps two copies of one model with the same gradients,
one eagerly and one through ``torch.compile(opt.step)`` (inductor), and compares every
parameter, every state entry and every param-group scalar (Prodigy's ``d``, ...).

Paths that run one of torch's fused kernels match bit for bit: the kernel runs outside the
traced graph (``_torch_compat.not_traced``). Foreach paths are traced and fused by inductor,
which evaluates the same expressions in another order: float32 agrees to ~1e-7 relative over
these steps (worst measured 1.2e-7 of the largest element; the tolerance leaves a factor ~10),
float64 to ~1e-15.

After the first two steps (state creation, then the first step with state) a steady loop
compiles nothing again: recompiles are read from dynamo's ``recompiles`` log.

Compiling is slow on a small CPU (seconds per graph), so the models are tiny, every case
compiles once and its run is shared by the tests that read it, and the module is ``slow``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import optimkit
from optimkit import _torch_compat as tc
from optimkit.factory import create_optimizer
from optimkit.factory.registry import REGISTRY

pytestmark = pytest.mark.slow

#: steps per run; RAdam's rectification switches on at step 6 (a new path: its first compile
#: there is not a recompile), Lookahead's first synchronisation is at step 5; Prodigy runs
#: long enough for d to change at several steps (its gather and update are not traced: they
#: read d, k, ... at every step, and traced they recompiled at each new d)
STEPS = 5
STEPS_OF = {"radam": 7, "prodigy": 10}
#: steps after which nothing compiles again
STEADY_AFTER = 2
STEADY_AFTER_OF: dict[str, int] = {}
#: Prodigy's d moves only with a signal: its gradients get a quadratic's pull (see _run)
PULL_OF = {"prodigy": 20.0}
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


@functools.lru_cache(maxsize=None)
def _compile_error() -> str:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    try:
        torch.compile(f)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure means "no backend here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


@pytest.fixture(autouse=True)
def _needs_compile():
    if _compile_error():
        pytest.skip(f"torch.compile unavailable on this machine ({_compile_error()})")


# ---------------------------------------------------------------------------------- runs
class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(4, 3, dtype=dtype)
        self.l2 = nn.Linear(3, 2, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)


@contextlib.contextmanager
def _recompiles() -> Iterator[list[str]]:
    """The functions dynamo compiles again (a guard failed) while the block runs."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage().splitlines()[0])

    log = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = Catch()
    torch._logging.set_logs(recompiles=True)
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()


def _run(build: Callable[[nn.Module], torch.optim.Optimizer], dtype: torch.dtype = torch.float32,
         steps: int = STEPS, sched: bool = False, pull: float = 0.0) -> dict[str, Any]:
    """Step an eager and a compiled copy with the same gradients; return both and the
    recompiles seen at each step. ``pull``: add ``pull * theta`` (the eager copy's) to each
    gradient, the gradient of a quadratic, so that Prodigy's d estimate moves."""
    torch._dynamo.reset()
    nets = [_Net(dtype), _Net(dtype)]
    opts = [build(n) for n in nets]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in opts] if sched else []
    compiled_step = torch.compile(opts[1].step)
    g = torch.Generator().manual_seed(1)
    per_step: list[list[str]] = []
    with _recompiles() as seen:
        for _ in range(steps):
            grads = [torch.randn(p.shape, generator=g, dtype=dtype) + pull * p.detach()
                     for p in nets[0].parameters()]
            for net in nets:
                for p, gr in zip(net.parameters(), grads):
                    p.grad = gr.clone()
            opts[0].step()
            before = len(seen)
            compiled_step()
            per_step.append(seen[before:])
            for s in scheds:
                s.step()
    return {"nets": nets, "opts": opts, "recompiles": per_step, "dtype": dtype}


def _assert_same(run: dict[str, Any]) -> None:
    (ne, nc), (oe, oc) = run["nets"], run["opts"]
    tol = TOL[run["dtype"]]
    for (name, pe), pc in zip(ne.named_parameters(), nc.parameters()):
        torch.testing.assert_close(pc, pe, **tol, msg=lambda m: f"parameter {name}: {m}")
        se, sc = oe.state[pe], oc.state[pc]
        assert sorted(sc) == sorted(se), name
        for key in se:
            a, b = sc[key], se[key]
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"state[{name}][{key}]: {m}")
            else:
                assert a == pytest.approx(b, rel=tol["rtol"], abs=tol["atol"]), (name, key)
    for ge, gc in zip(oe.param_groups, oc.param_groups):
        for key, b in ge.items():
            if key != "params" and isinstance(b, float):
                assert gc[key] == pytest.approx(b, rel=tol["rtol"], abs=tol["atol"]), key


@functools.lru_cache(maxsize=None)
def _registry_run(name: str) -> dict[str, Any]:
    return _run(lambda net: create_optimizer(name, net), steps=STEPS_OF.get(name, STEPS),
                pull=PULL_OF.get(name, 0.0))


NAMES = [*sorted(REGISTRY), "lookahead_adam"]


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_matches_eager(name):
    _assert_same(_registry_run(name))


@pytest.mark.parametrize("name", NAMES)
def test_steady_loop_does_not_recompile(name):
    run = _registry_run(name)
    after = STEADY_AFTER_OF.get(name, STEADY_AFTER)
    late = {i + 1: r for i, r in enumerate(run["recompiles"]) if i >= after and r}
    assert not late, late
    if name == "prodigy":  # the run covers what recompiled before: d moving step after step
        d = [g["d"] for g in run["opts"][0].param_groups]
        assert d[0] > 1e-6 * 10, d


# ------------------------------------------------------------------- the paths beyond the default
OTHER = {
    # a foreach path traced by inductor (RMSprop's with the most ops), in float64: agreement to
    # float64 rounding shows inductor changed only the order of evaluation
    "rmsprop-centered-momentum-float64": (
        lambda n: optimkit.RMSprop(n.parameters(), lr=1e-2, centered=True, momentum=0.9),
        torch.float64),
}


@pytest.mark.parametrize("case", sorted(OTHER))
def test_other_paths_match_eager(case):
    build, dtype = OTHER[case]
    run = _run(build, dtype)
    _assert_same(run)
    assert not any(run["recompiles"][STEADY_AFTER:]), run["recompiles"]


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_scheduled_lr_matches_eager(name):
    """A scheduler changing lr every step: the compiled step must use each step's lr. SGD's
    step (its kernel outside the graph) does not compile again for a new lr; Adam's ``_update``
    recompiles for each new float lr until dynamo's recompile limit, then runs eagerly (as
    torch.optim with a float lr; correctness is what this checks)."""
    run = _run(lambda net: create_optimizer(name, net), steps=3, sched=True)
    _assert_same(run)
    if name == "momentum":
        assert not any(run["recompiles"][STEADY_AFTER:]), run["recompiles"]


def test_compile_true_under_an_outer_compile():
    """optimkit's own compiled kernels (compile=True) inside a compiled step: no crash, and the
    same result as the same optimizer stepped eagerly."""
    run = _run(lambda net: optimkit.Adadelta(net.parameters(), compile=True, flat=True), steps=3)
    _assert_same(run)


# ------------------------------------------------------------------ the root fix, at the unit level
def _kernel_calls() -> dict[str, Callable[[], tuple[list[torch.Tensor], Callable[[], None]]]]:
    def tensors(n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        return [torch.randn(5, generator=g) for _ in range(n)]

    def sgd():
        p, g, b = tensors(2), tensors(2), tensors(2)
        return p + b, lambda: tc.fused_sgd_(
            p, g, b, weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
            maximize=False, is_first_step=False, grad_scale=None, found_inf=None)

    def adagrad():
        p, g, s = tensors(2), tensors(2), [x.abs() for x in tensors(2)]
        steps = [torch.tensor(3.0), torch.tensor(3.0)]
        return p + s, lambda: tc.fused_adagrad_(
            p, g, s, steps, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
            grad_scale=None, found_inf=None)

    def adam_shared_step_grad_scale():  # as RMSprop / RAdam / Prodigy call it
        p, g, m, v = tensors(2), tensors(2), tensors(2), [x.abs() for x in tensors(2)]
        step = tc.fused_adam_unit_step(torch.device("cpu"))
        return p + m + v, lambda: tc.fused_adam_(
            p, g, m, v, [], [step, step], amsgrad=False, lr=0.1, beta1=0.9, beta2=0.99,
            weight_decay=0.0, eps=1e-8, maximize=False, grad_scale=torch.tensor(2.0),
            found_inf=None)

    return {"sgd": sgd, "adagrad": adagrad, "adam-shared-step-grad-scale": adam_shared_step_grad_scale}


@pytest.mark.parametrize("kernel", sorted(_kernel_calls()))
def test_fused_kernels_run_outside_traced_graphs(kernel):
    """Traced, these kernels fail (no fake kernel for ``_fused_sgd_``/``_fused_adagrad_``; a
    functionalization assert for ``_fused_adam_`` with a shared step and grad_scale); kept out
    of the graph they run as in eager mode."""
    make = _kernel_calls()[kernel]
    eager_out, eager_call = make()
    eager_call()
    torch._dynamo.reset()
    out, call = make()
    torch.compile(call, backend="aot_eager")()
    for a, b in zip(out, eager_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
