"""No optimizer changes ``p.grad``: every class, every implementation, float32 (the fast
paths), with the options that touch the gradient (maximize, weight decay).

torch's fused kernels write the unscaled gradient back when given a ``grad_scale`` (they
mirror GradScaler's in-place unscale); Prodigy's fused phase 2 uses one, and once let
``p.grad`` come back multiplied by ``d``. Users log, clip or accumulate gradients after
``step()``, so this is checked for everything.
"""

from __future__ import annotations

import pytest
import torch

import optimkit
from optim_db import IMPL_FLAGS, OPTIMS

ROWS = [pytest.param(info, cfg, impl, id=f"{info.name}-{impl}-{i}")
        for info in OPTIMS for i, cfg in enumerate(info.configs) for impl in info.impls]
PRODIGY = [dict(), dict(weight_decay=0.1, decouple=False), dict(weight_decay=0.1),
           dict(slice_p=3), dict(betas=(0.0, 0.99))]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # sizes around Prodigy's fused-path piece size (1 MiB / 4 B), so pieces cut tensors
    shapes = [(300, 1000), (7, 5), (513,), (), (262144 + 7,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def _check(opt, ps) -> None:
    for _ in range(3):
        before = [p.grad.clone() for p in ps]
        opt.step()
        for i, (b, p) in enumerate(zip(before, ps)):
            assert torch.equal(b, p.grad), f"p.grad of parameter {i} changed"


@pytest.mark.parametrize("info,cfg,impl", ROWS)
def test_step_leaves_gradients_unchanged(info, cfg, impl):
    ps = _params()
    _check(info.cls(ps, **cfg, **IMPL_FLAGS[impl]), ps)


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(flat=True)],
                         ids=["foreach", "reference", "flat"])
@pytest.mark.parametrize("kw", PRODIGY, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_prodigy_step_leaves_gradients_unchanged(kw, flags):
    if flags.get("flat") and kw.get("slice_p", 1) != 1:
        pytest.skip("slice_p > 1 needs the per-tensor layout")
    ps = _params()
    _check(optimkit.Prodigy(ps, **kw, **flags), ps)
