"""Adam / AdamW / RAdam specifics the generic tables do not cover.

* A default-constructed optimizer has torch.optim's param-group *values* (the generic test
  checks keys and signature defaults; AdamW's ``decoupled_weight_decay=True`` is a value).
* ``step`` is stored in torch.optim's default (non-fused) layout whichever path runs, so a
  checkpoint written under ``fused=True`` is the same as one written by torch's default.
* Old checkpoints with a Python-number ``step`` load and continue as in torch.optim.
"""

from __future__ import annotations

import copy

import pytest
import torch

import harness
import optimkit

PAIRS = [
    (optimkit.Adam, torch.optim.Adam),
    (optimkit.AdamW, torch.optim.AdamW),
    (optimkit.RAdam, torch.optim.RAdam),
]


def _p():
    return torch.nn.Parameter(torch.randn(3, dtype=torch.float64))


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__name__)
def test_default_group_values_equal_torch(ours, theirs):
    a, b = ours([_p()]), theirs([_p()])
    ga = {k: v for k, v in a.param_groups[0].items() if k != "params"}
    gb = {k: v for k, v in b.param_groups[0].items() if k != "params"}
    assert ga == gb


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(foreach=False)],
                         ids=["fused", "foreach", "reference"])
def test_step_layout_is_torch_default(flags):
    p, q = _p(), _p()
    ours, theirs = optimkit.Adam([p], **flags), torch.optim.Adam([q], foreach=False)
    p.grad = torch.ones(3, dtype=torch.float64)
    q.grad = p.grad.clone()
    ours.step()
    theirs.step()
    sa, sb = ours.state[p]["step"], theirs.state[q]["step"]
    assert (sa.device, sa.dtype, sa.shape) == (sb.device, sb.dtype, sb.shape)
    assert sa.item() == sb.item() == 1


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__name__)
def test_numeric_step_checkpoint_continues_as_torch(ours, theirs):
    net, opt, _ = harness.run(lambda g: theirs(g, foreach=False), steps=5, events=False)
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = float(st["step"])  # the pre-1.12 torch format
    runs = []
    for cls in (ours, theirs):
        n = copy.deepcopy(net)
        o = cls(n.groups({}), foreach=False)
        o.load_state_dict(copy.deepcopy(sd))
        runs.append(harness.run(None, net=n, opt=o, start=5, steps=5, events=False))
    harness.assert_same_trajectory(*runs[0][:2], *runs[1][:2], **harness.tolerances(torch.float64))
