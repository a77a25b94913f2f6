"""``flat=True`` never changes what an optimizer computes (docs/flat.md), for every optimizer:

* a parameter that got no gradient in a step (an unused head, an unrouted expert) is not
  stepped, decayed or counted, exactly as with ``flat=False`` (including its effect on
  Prodigy's d), and steps flat again once the counters agree;
* ``model.to(dtype)`` after a backward: ``zero_grad()`` leaves no stale gradient behind;
* two distinct Parameters over one memory (tied weights) stay tied;
* a model whose parameters were flattened saves and reloads with safetensors
  (``save_model``/``load_model``, what ``accelerate.save_state`` uses) with every weight intact.

The oracle is the same optimizer with ``flat=False`` (itself tested against torch.optim and
prodigyopt), run on an identical model; float64 so the only differences are rounding order.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import optimkit

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MAKERS = {
    "SGD": lambda ps, **kw: optimkit.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, **kw),
    "Adagrad": lambda ps, **kw: optimkit.Adagrad(ps, lr=0.05, weight_decay=1e-2, **kw),
    "RMSprop": lambda ps, **kw: optimkit.RMSprop(ps, lr=1e-2, momentum=0.5, weight_decay=1e-2, **kw),
    "Adam": lambda ps, **kw: optimkit.Adam(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "AdamW": lambda ps, **kw: optimkit.AdamW(ps, lr=1e-2, **kw),
    "RAdam": lambda ps, **kw: optimkit.RAdam(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "Adadelta": lambda ps, **kw: optimkit.Adadelta(ps, lr=1.0, weight_decay=1e-2, **kw),
    "Prodigy": lambda ps, **kw: optimkit.Prodigy(ps, weight_decay=1e-2, **kw),
}
TOL = dict(rtol=1e-12, atol=1e-14)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8, dtype=torch.float64)
        self.head_a = nn.Linear(8, 3, dtype=torch.float64)
        self.head_b = nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head_a(h) + (self.head_b(h) if use_b else 0)


def _run(name: str, flat: bool, schedule: list[bool], zero=None):
    model = TwoHeads()
    opt = MAKERS[name](model.parameters(), flat=flat)
    g = torch.Generator().manual_seed(1)
    trace = []
    for use_b in schedule:
        opt.zero_grad() if zero is None else zero(model, opt)
        model(torch.randn(16, 6, generator=g, dtype=torch.float64), use_b).pow(2).mean().backward()
        opt.step()
        trace.append([p.detach().clone() for p in model.parameters()])
    return model, opt, trace


# head_b is used, then unused for 4 steps (its gradient stays None / never arrives), then used
SCHEDULE = [True, True, False, False, False, False, True, True, True]


@pytest.mark.parametrize("name", list(MAKERS))
def test_parameter_without_gradient_is_not_stepped(name):
    ref_model, ref_opt, ref_trace = _run(name, False, SCHEDULE)
    model, opt, trace = _run(name, True, SCHEDULE)
    for t, (a, b) in enumerate(zip(trace, ref_trace)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"step {t}: {m}")
    # while unused, head_b did not move at all (no weight decay, no momentum)
    for t in range(2, 6):
        assert torch.equal(trace[t][4], trace[1][4]) and torch.equal(trace[t][5], trace[1][5])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        sa, sb = opt.state[p], ref_opt.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sb[k], torch.Tensor):
                torch.testing.assert_close(sa[k].to(sb[k].dtype), sb[k], **TOL)
            else:
                assert sa[k] == sb[k], k
    if name == "Prodigy":
        assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=1e-12)
    # once every member has stepped the same number of times again the bucket steps flat
    assert opt._buckets[0], "the bucket was dissolved"


@pytest.mark.parametrize("name", ["SGD", "AdamW", "Prodigy"])
def test_unused_parameter_after_set_to_none_false_is_stepped_as_torch(name):
    """zero_grad(set_to_none=False) keeps zero gradients, which torch.optim does step."""
    zero = lambda m, o: o.zero_grad(set_to_none=False)  # noqa: E731
    _, _, ref = _run(name, False, SCHEDULE, zero=zero)
    _, _, got = _run(name, True, SCHEDULE, zero=zero)
    for a, b in zip(got[-1], ref[-1]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Prodigy"])
def test_gradient_written_by_hand_into_the_view_counts(name):
    """A flat member's .grad is a zero view after zero_grad(); writing into it by hand (no
    backward) is a gradient, as assigning p.grad would be without flat."""
    def run(flat: bool):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(5, dtype=torch.float64))
        v = nn.Parameter(torch.randn(4, dtype=torch.float64))
        opt = MAKERS[name]([w, v], flat=flat)
        for t in range(4):
            opt.zero_grad()
            g = torch.full((5,), 0.1 * (t + 1), dtype=torch.float64)
            gv = torch.full((4,), -0.2, dtype=torch.float64)
            if flat:
                w.grad.copy_(g)
                v.grad.copy_(gv)
            else:
                w.grad, v.grad = g, gv
            opt.step()
        return w.detach(), v.detach()

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("to", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adadelta", "RMSprop"])
def test_model_to_dtype_leaves_no_stale_gradient(name, to):
    """nn.Module.to() converts each p.grad by swapping its .data: the flat views are gone.
    zero_grad() must zero (None) them as without flat, and training goes on as without flat."""
    def run(flat: bool):
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = MAKERS[name](m.parameters(), flat=flat)
        x = torch.randn(8, 4)
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
        m.to(to)
        opt.zero_grad()
        assert all(p.grad is None for p in m.parameters()), "stale gradients survived zero_grad"
        m(x.to(to)).sum().backward()
        opt.step()
        return [p.detach() for p in m.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in zip(run(True), run(False)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_tied_weights_stay_tied(name):
    def run(flat: bool):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        tied = nn.Parameter(w.data)  # a second Parameter over the same memory
        other = nn.Parameter(torch.randn(3, dtype=torch.float64))
        opt = MAKERS[name]([{"params": [w, other]}, {"params": [tied]}], flat=flat)
        x = torch.randn(5, 4, dtype=torch.float64)
        for _ in range(4):
            opt.zero_grad()
            ((x @ w).sum() + (x @ tied.T).pow(2).sum() + other.pow(2).sum()).backward()
            opt.step()
            assert w.data_ptr() == tied.data_ptr()
        return w.detach(), other.detach()

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["SGD", "AdamW", "Prodigy"])
def test_flattened_model_saves_and_loads_with_safetensors(name, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is in the integration extra")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = MAKERS[name](model.parameters(), flat=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
    path = str(tmp_path / "model.safetensors")
    st.save_model(model, path)
    assert sorted(st.load_file(path)) == sorted(n for n, _ in model.named_parameters())
    fresh = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    missing, unexpected = st.load_model(fresh, path)
    assert not missing and not unexpected
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # and the optimizer still steps the model it flattened (the memory is still shared)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    (bucket,) = opt._buckets[0]
    assert torch.equal(bucket.flat_p, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


SPARSE_MAKERS = {
    "SGD": lambda ps, **kw: optimkit.SGD(ps, lr=0.1, momentum=0.9, **kw),
    "Adagrad": lambda ps, **kw: optimkit.Adagrad(ps, lr=0.1, **kw),
    "Adam (refuses)": lambda ps, **kw: optimkit.Adam(ps, lr=0.1, **kw),
    "SGD weight_decay (refuses)": lambda ps, **kw: optimkit.SGD(ps, lr=0.1, weight_decay=0.1, **kw),
    "Adagrad weight_decay (refuses)": lambda ps, **kw: optimkit.Adagrad(ps, lr=0.1, weight_decay=0.1, **kw),
}


@pytest.mark.parametrize("name", list(SPARSE_MAKERS))
def test_sparse_gradient_stays_sparse(name):
    """nn.Embedding(sparse=True) under flat=True: the sparse gradient is not accumulated into
    the dense flat view (which would make Adam step where it must refuse, and weight decay
    touch every row); it is stored as without flat, and the step is what flat=False does."""
    def run(flat: bool):
        torch.manual_seed(0)
        emb, lin = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1)
        opt = SPARSE_MAKERS[name]([*lin.parameters(), *emb.parameters()], flat=flat)
        out = []
        for t in range(4):
            opt.zero_grad()
            x = emb(torch.tensor([1, 2, 2, 7 - t])) if t else torch.randn(4, 3)
            lin(x).sum().backward()  # step 0: the embedding gets no gradient
            if t:
                assert emb.weight.grad.is_sparse
            try:
                opt.step()
            except RuntimeError as e:
                out.append(("raised", str(e).split(":")[0]))
                break
            out.append([p.detach().clone() for p in (*lin.parameters(), emb.weight)])
        return out

    got, want = run(True), run(False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(b, tuple):
            assert a == b
        else:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
