"""Prodigy across processes: a real 2-rank gloo job on CPU against a single-process run.

One spawn runs four scenarios (process start-up dominates the cost):

* ``shards``: every parameter is split element-wise between the ranks (as FSDP1 flat
  parameters are), ``fsdp_in_use=True``; each step the ranks all-gather the full parameters,
  compute the full gradient and keep their shard of it (what FSDP's reduce-scatter gives).
  The d statistics are sums over elements, so the sharded run must reproduce the
  single-process run on the unsharded parameters. With ``slice_p=3`` the shard boundaries
  are multiples of 3, so each rank's ``[::3]`` slice is its part of the global slice.
* ``nograd``: rank 0 owns two tensors with gradients, rank 1 owns two tensors that never get
  a gradient. Rank 1 must still join the all-reduce (no hang), agree on ``d``, and leave its
  tensors untouched; rank 0 must match the single-process run.
* ``dtensor``: parameters are DTensors sharded on dim 0 over a CPU device mesh (FSDP2's
  layout); Prodigy detects them without ``fsdp_in_use``.
* ``dcp``: DTensor parameters with uneven shards (5 rows: 3 + 2; 1 row: 1 + 0, an empty
  shard) are checkpointed half-way with ``torch.distributed.checkpoint`` and resumed into a
  fresh optimizer over different weights, for ``slice_p`` 1 and 3 (with 3 the ranks' slices
  of the 5-row parameter differ in length). The resumed run must equal the uninterrupted one
  exactly, every rank's state included: DCP takes plain tensors as replicated, so state kept
  as per-rank plain tensors fails to save or comes back holding another rank's values.

prodigyopt itself cannot run any of these on a CPU-only machine: its FSDP path allocates the
all-reduce buffer with ``.cuda()``.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optimkit

STEPS = 25
HP = dict(weight_decay=0.01, use_bias_correction=True, d_coef=1.5)


def _problem() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 20, generator=g, dtype=torch.float64)
    y = torch.randn(48, 3, generator=g, dtype=torch.float64)
    params = [torch.randn(*s, generator=g, dtype=torch.float64) * 0.3
              for s in ((20, 8), (8,), (8, 3), (3,))]
    return params, x, y


def _full_grads(full: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: int) -> list[torch.Tensor]:
    ps = [p.detach().clone().requires_grad_(True) for p in full]
    w1, b1, w2, b2 = ps
    xb, yb = x[(t % 3) * 16:(t % 3) * 16 + 16], y[(t % 3) * 16:(t % 3) * 16 + 16]
    loss = ((torch.tanh(xb @ w1 + b1) @ w2 + b2 - yb) ** 2).mean()
    return list(torch.autograd.grad(loss, ps))


def _split(n: int, slice_p: int) -> int:
    return max((n // 2) // slice_p * slice_p, 0)


def single_process(slice_p: int, with_grad: tuple[int, ...] = (0, 1, 2, 3),
                   ) -> tuple[list[torch.Tensor], float]:
    params, x, y = _problem()
    ps = [p.clone() for p in params]
    opt = optimkit.Prodigy([ps[i] for i in with_grad], slice_p=slice_p, **HP)
    for t in range(STEPS):
        grads = _full_grads(ps, x, y, t)
        for i in with_grad:
            ps[i].grad = grads[i]
        opt.step()
    return ps, opt.param_groups[0]["d"]


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out: dict[str, object] = {}
    params, x, y = _problem()

    # -- shards: element-wise shards of every tensor, fsdp_in_use=True
    for slice_p in (1, 3):
        bounds = [(0, _split(p.numel(), slice_p)) if rank == 0 else (_split(p.numel(), slice_p), p.numel())
                  for p in params]
        shards = [p.reshape(-1)[lo:hi].clone() for p, (lo, hi) in zip(params, bounds)]
        opt = optimkit.Prodigy(shards, fsdp_in_use=True, slice_p=slice_p, **HP)
        for t in range(STEPS):
            full = _gather(shards, bounds, params)
            grads = _full_grads(full, x, y, t)
            for sh, g, (lo, hi) in zip(shards, grads, bounds):
                sh.grad = g.reshape(-1)[lo:hi].clone()
            opt.step()
        out[f"shards{slice_p}"] = (_gather(shards, bounds, params), opt.param_groups[0]["d"])

    # -- split: element-wise shards in two groups with their own d (split_groups), lrs 1 and 4;
    # every step reduces both groups' sums in one all-reduce
    bounds = [(0, _split(p.numel(), 1)) if rank == 0 else (_split(p.numel(), 1), p.numel())
              for p in params]
    shards = [p.reshape(-1)[lo:hi].clone() for p, (lo, hi) in zip(params, bounds)]
    opt = optimkit.Prodigy([{"params": shards[:2]}, {"params": shards[2:], "lr": 4.0,
                                                     "d_coef": 0.5}],
                           fsdp_in_use=True, split_groups=True, **HP)
    calls = {"n": 0}
    orig_all_reduce = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return orig_all_reduce(*a, **k)

    for t in range(STEPS):
        full = _gather(shards, bounds, params)
        grads = _full_grads(full, x, y, t)
        for sh, g, (lo, hi) in zip(shards, grads, bounds):
            sh.grad = g.reshape(-1)[lo:hi].clone()
        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = orig_all_reduce
    out["split"] = (_gather(shards, bounds, params), [g["d"] for g in opt.param_groups],
                    calls["n"])

    # -- nograd: rank 1's tensors never get a gradient
    mine = [params[0].clone(), params[1].clone()] if rank == 0 else [params[2].clone(), params[3].clone()]
    opt = optimkit.Prodigy(mine, fsdp_in_use=True, **HP)
    for t in range(STEPS):
        if rank == 0:
            grads = _full_grads([mine[0], mine[1], params[2], params[3]], x, y, t)
            mine[0].grad, mine[1].grad = grads[0], grads[1]
        opt.step()
    out["nograd"] = ([m.clone() for m in mine], opt.param_groups[0]["d"])

    # -- dtensor: FSDP2-style DTensor parameters, detected without fsdp_in_use
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    dparams = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in params]
    opt = optimkit.Prodigy(dparams, **HP)
    for t in range(STEPS):
        grads = _full_grads([p.full_tensor() for p in dparams], x, y, t)
        for p, g in zip(dparams, grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    out["dtensor"] = ([p.full_tensor().detach().clone() for p in dparams], opt.param_groups[0]["d"],
                      type(opt.state[dparams[0]]["exp_avg"]).__name__)

    for slice_p in (1, 3):
        out[f"dcp{slice_p}"] = _dcp_scenario(mesh, slice_p, os.path.join(outdir, f"dcp{slice_p}"))

    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


DCP_SHAPES = ((5, 7), (3,), (1, 4))


def _dcp_scenario(mesh, slice_p: int, ckpt_dir: str) -> dict[str, object]:
    """Uninterrupted vs saved-at-half and resumed; returns this rank's results of both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in DCP_SHAPES]
    target = [torch.randn(s, generator=g, dtype=torch.float64) for s in DCP_SHAPES]

    def build(seed_shift: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Module()
        for i, p in enumerate(start):
            dp = distribute_tensor(p + seed_shift, mesh, [Shard(0)])
            model.register_parameter(f"w{i}", torch.nn.Parameter(dp))
        return model, optimkit.Prodigy(model.parameters(), slice_p=slice_p, **HP)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, lo: int, hi: int) -> None:
        for t in range(lo, hi):
            for p, tg in zip(model.parameters(), target):
                # gradient of a quadratic with a step-dependent curvature
                full = (p.full_tensor().detach() - tg) * (1.0 + 0.1 * (t % 4))
                p.grad = distribute_tensor(full, mesh, [Shard(0)])
            opt.step()

    def result(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
        return {
            "params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "d": opt.param_groups[0]["d"],
            "state": [{k: (v.to_local().clone() if hasattr(v, "to_local") else v)
                       for k, v in opt.state[p].items()} for p in model.parameters()],
            "state_types": sorted({type(v).__name__ for p in model.parameters()
                                   for k, v in opt.state[p].items() if k != "step"}),
        }

    half = STEPS // 2
    model, opt = build(0.0)
    train(model, opt, 0, STEPS)
    full = result(model, opt)

    model, opt = build(0.0)
    train(model, opt, 0, half)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    model, opt = build(1.0)  # other weights: the checkpoint must overwrite them
    msd, osd = get_state_dict(model, opt)  # allocates the state for dcp.load to fill
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, half, STEPS)
    return {"full": full, "resumed": result(model, opt)}


def _gather(shards: list[torch.Tensor], bounds: list[tuple[int, int]],
            like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The full tensors: each rank writes its shard into zeros and the ranks sum."""
    full = []
    for sh, (lo, hi), p in zip(shards, bounds, like):
        buf = torch.zeros(p.numel(), dtype=sh.dtype)
        buf[lo:hi] = sh.detach()
        dist.all_reduce(buf)
        full.append(buf.reshape(p.shape))
    return full


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("prodigy_dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:  # only the two processes this fixture started
                if proc.is_alive():
                    proc.kill()
            pytest.fail("the 2-rank gloo job did not finish in 150 s (a rank hung?)")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("slice_p", [1, 3])
def test_sharded_matches_single_process(results, slice_p):
    want_params, want_d = single_process(slice_p)
    for rank in range(2):
        got_params, got_d = results[rank][f"shards{slice_p}"]
        assert got_d == pytest.approx(want_d, rel=1e-10)
        assert got_d > HP.get("d0", 1e-6)  # d moved: the comparison is not vacuous
        for g, w in zip(got_params, want_params):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def split_single_process() -> tuple[list[torch.Tensor], list[float]]:
    """Two independent Prodigy optimizers on the full parameters: the oracle of split_groups."""
    params, x, y = _problem()
    ps = [p.clone() for p in params]
    opts = [optimkit.Prodigy(ps[:2], **HP), optimkit.Prodigy(ps[2:], lr=4.0, **{**HP, "d_coef": 0.5})]
    for t in range(STEPS):
        for p, g in zip(ps, _full_grads(ps, x, y, t)):
            p.grad = g
        for o in opts:
            o.step()
    return ps, [o.param_groups[0]["d"] for o in opts]


def test_split_groups_sharded_one_collective_per_step(results):
    want_params, want_d = split_single_process()
    assert want_d[0] != want_d[1]  # two estimates: the comparison is not vacuous
    for rank in range(2):
        got_params, got_d, n_reduce = results[rank]["split"]
        assert n_reduce == STEPS  # both groups' sums in one all-reduce per step
        assert got_d == pytest.approx(want_d, rel=1e-10)
        for g, w in zip(got_params, want_params):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_rank_without_grads_joins_and_matches(results):
    want_params, want_d = single_process(1, with_grad=(0, 1))
    (p0_r0, d_r0), (p_r1, d_r1) = results[0]["nograd"], results[1]["nograd"]
    assert d_r0 == d_r1 == pytest.approx(want_d, rel=1e-10)
    for g, w in zip(p0_r0, want_params[:2]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    params, _, _ = _problem()
    for g, w in zip(p_r1, params[2:]):
        assert torch.equal(g, w)  # never had a gradient: untouched


def test_dtensor_parameters_match_single_process(results):
    want_params, want_d = single_process(1)
    for rank in range(2):
        got_params, got_d, state_type = results[rank]["dtensor"]
        assert state_type == "DTensor"  # exp_avg keeps the parameter's sharding
        assert got_d == pytest.approx(want_d, rel=1e-10)
        for g, w in zip(got_params, want_params):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("slice_p", [1, 3])
def test_dcp_checkpoint_resumes_exactly_with_uneven_shards(results, slice_p):
    for rank in range(2):
        full, resumed = results[rank][f"dcp{slice_p}"]["full"], results[rank][f"dcp{slice_p}"]["resumed"]
        assert full["state_types"] == ["DTensor"]  # s, p0, exp_avg, exp_avg_sq
        assert full["d"] > HP.get("d0", 1e-6)  # d moved: s and p0 matter after the resume
        assert resumed["d"] == full["d"]
        for g, w in zip(resumed["params"], full["params"]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for i, (st_got, st_want) in enumerate(zip(resumed["state"], full["state"])):
            assert st_got.keys() == st_want.keys()
            for k in st_want:
                got, want = st_got[k], st_want[k]
                if isinstance(want, torch.Tensor):
                    torch.testing.assert_close(got, want, rtol=0, atol=0,
                                               msg=f"rank {rank}, param {i}, state {k!r}")
                else:
                    assert got == want, (rank, i, k)
    # rank 1's shard of the 1-row parameter is empty; the 5-row parameter's slices differ
    local_s = [results[r][f"dcp{slice_p}"]["full"]["state"] for r in range(2)]
    assert local_s[1][2]["exp_avg"].numel() == 0
    if slice_p == 3:  # 21 and 14 local elements: slices of 7 and 5, padded to one width of 7
        assert local_s[0][0]["s"].shape == local_s[1][0]["s"].shape == (1, 7)
        assert local_s[1][0]["s"][0, 5:].eq(0).all() and local_s[1][0]["p0"][0, 5:].eq(0).all()


# ==================================================================== faults across ranks
# A second 2-rank job: inputs on one rank that must not leave the other waiting in Prodigy's
# collective, empty shards, and sharding that was not declared. Collectives time out after
# PG_TIMEOUT_S, so a rank left waiting fails its scenario quickly instead of hanging the job.
PG_TIMEOUT_S = 10
FAULT_STEPS = 6


def _fault_problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=g)
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 16, generator=g) * 0.3)
        lin.bias.copy_(torch.randn(4, generator=g) * 0.3)
    return lin, x


def _fault_groups(model):
    # optimkit.param_groups' layout: decayed weights, then biases (one tensor: ZeRO gives
    # rank 1 an empty share of the first group and rank 0 none of the second)
    return [{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias],
                                                              "weight_decay": 0.0}]


def _fault_step(model, opt, x, t):
    opt.zero_grad()
    (model(x[(t % 2) * 16:(t % 2) * 16 + 16]) ** 2).mean().backward()
    opt.step()


def fault_single(steps: int = FAULT_STEPS, **kw) -> tuple[list[torch.Tensor], list[float]]:
    model, x = _fault_problem()
    opt = optimkit.Prodigy(_fault_groups(model), **kw)
    ds = []
    for t in range(steps):
        _fault_step(model, opt, x, t)
        ds.append(opt.param_groups[0]["d"])
    return [p.detach().clone() for p in model.parameters()], ds


def _snapshot(opt, params) -> list:
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
              for k, v in opt.state[p].items()} for p in params if p in opt.state]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [[p.detach().clone() for p in params], state, groups]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _count_collectives(counter: dict) -> None:
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            counter[_name] = counter.get(_name, 0) + 1
            return _orig(*a, **k)

        setattr(dist, name, wrapped)


def _zero(groups, **kw):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=optimkit.Prodigy, **kw)


def _failing_step(opt, params, breaks) -> dict:
    """Break this rank's inputs (or not), step, and report what happened."""
    before = _snapshot(opt, params)
    breaks()
    t0 = time.monotonic()
    err = None
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - the type and message are the result
        err = (type(e).__name__, str(e))
    return {"error": err, "seconds": time.monotonic() - t0,
            "unchanged": _same(before, _snapshot(opt, params))}


def _fault_scenarios(rank: int) -> dict:
    import warnings

    out: dict[str, object] = {}

    # -- ZeRO over two param groups with fsdp_in_use: rank 1's share of group 0 is empty
    model, x = _fault_problem()
    opt = _zero(_fault_groups(model), fsdp_in_use=True)
    ds = []
    for t in range(FAULT_STEPS):
        _fault_step(model, opt, x, t)
        ds.append(opt.param_groups[0]["d"])
    local = [len(g["params"]) for g in opt.optim.param_groups]
    out["zero_flag"] = {"d": ds, "params": [p.detach().clone() for p in model.parameters()],
                        "local": local}

    # -- the same without fsdp_in_use: detected at the first step (with a warning) and reduced
    model, x = _fault_problem()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = _zero(_fault_groups(model))
        ds = []
        for t in range(FAULT_STEPS):
            _fault_step(model, opt, x, t)
            ds.append(opt.param_groups[0]["d"])
    out["zero_noflag"] = {"d": ds, "params": [p.detach().clone() for p in model.parameters()],
                          "warnings": [str(m.message) for m in w if "Prodigy" in str(m.message)]}

    # -- data parallel (every rank holds every parameter), no flag: one collective, once
    model, x = _fault_problem()
    opt = optimkit.Prodigy(_fault_groups(model))
    counter: dict[str, int] = {}
    orig = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                          "broadcast")}
    _count_collectives(counter)
    calls, ds = [], []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            for t in range(FAULT_STEPS):
                before = sum(counter.values())
                _fault_step(model, opt, x, t)
                calls.append(sum(counter.values()) - before)
                ds.append(opt.param_groups[0]["d"])
        finally:
            for n, f in orig.items():
                setattr(dist, n, f)
    out["replicated"] = {"d": ds, "calls": calls, "params": [p.detach().clone() for p in
                                                              model.parameters()],
                         "warnings": [str(m.message) for m in w if "Prodigy" in str(m.message)]}

    # -- every group empty on rank 1 (a ZeRO shard with nothing): it still joins
    model, x = _fault_problem()
    groups = _fault_groups(model) if rank == 0 else [{"params": []}, {"params": []}]
    opt = optimkit.Prodigy(groups, fsdp_in_use=True)
    ds = []
    for t in range(FAULT_STEPS):
        if rank == 0:
            _fault_step(model, opt, x, t)
        else:
            opt.step()
        ds.append(opt.param_groups[0]["d"])
    out["all_empty"] = {"d": ds, "params": [p.detach().clone() for p in model.parameters()]}

    # -- one rank's step raises before the collective: every rank raises, nothing changes,
    # and both continue together afterwards. In each mode: declared sharding (reduce) and
    # the first step of an undeclared one (check).
    for name, kw in (("fail_reduce", dict(fsdp_in_use=True)), ("fail_check", {})):
        model, x = _fault_problem()
        opt = optimkit.Prodigy(_fault_groups(model), **kw)
        if kw:
            for t in range(2):
                _fault_step(model, opt, x, t)
        opt.zero_grad()
        (model(x) ** 2).mean().backward()

        def sparse(model=model):
            if rank == 1:
                model.bias.grad = model.bias.grad.to_sparse()

        res = _failing_step(opt, list(model.parameters()), sparse)
        ds = []
        for t in range(3):
            _fault_step(model, opt, x, t)
            ds.append(opt.param_groups[0]["d"])
        res["d_after"] = ds
        out[name] = res

    # -- a non-finite gradient, an output that would overflow, or a d*eps that underflows
    # only where rank 0 computes in float32: decided from all-reduced values, on every rank
    def nan(model):
        if rank == 0:
            model.weight.grad[0, 0] = float("nan")

    def huge(model):
        if rank == 1:
            model.weight.grad[0, 0] = 1e35

    for name, breaks, kw, dtype in (
            ("nonfinite", nan, {}, torch.float32),
            ("overflow", huge, {}, torch.float32),
            ("underflow", lambda m: None, dict(d0=1e-40),
             torch.float32 if rank == 0 else torch.float64)):
        model, x = _fault_problem()
        model.to(dtype)
        opt = optimkit.Prodigy(_fault_groups(model), fsdp_in_use=True, **kw)
        if name != "underflow":
            for t in range(2):
                opt.zero_grad()
                (model(x.to(dtype)) ** 2).mean().backward()
                opt.step()
        opt.zero_grad()
        (model(x.to(dtype)) ** 2).mean().backward()
        out[name] = _failing_step(opt, list(model.parameters()), lambda m=model: breaks(m))
    return out


def _fault_worker(rank: int, port: int, outdir: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        torch.save(_fault_scenarios(rank), os.path.join(outdir, f"faults{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("prodigy_faults"))
    ctx = mp.start_processes(_fault_worker, args=(_free_port(), outdir), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("the 2-rank fault job did not finish in 90 s (a rank hung?)")
    finally:
        for proc in ctx.processes:  # only the two processes this fixture started
            if proc.is_alive():
                proc.kill()
    return [torch.load(os.path.join(outdir, f"faults{r}.pt"), weights_only=False)
            for r in range(2)]


def test_zero_with_an_empty_share_of_group_0_steps_on_every_rank(faults):
    want_params, want_d = fault_single()
    r0, r1 = faults[0]["zero_flag"], faults[1]["zero_flag"]
    assert r0["local"] == [1, 0] or r1["local"] == [0, 1]  # the empty share is real
    assert r0["d"] == r1["d"]
    assert r0["d"] == pytest.approx(want_d, rel=1e-6) and want_d[-1] > 1e-6
    for a, b, w in zip(r0["params"], r1["params"], want_params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-7)


def test_zero_without_fsdp_in_use_is_detected_and_reduced(faults):
    """ZeroRedundancyOptimizer without fsdp_in_use: every rank warns once and uses the d of
    the whole model, the same as with the flag."""
    flag = faults[0]["zero_flag"]
    for rank in range(2):
        r = faults[rank]["zero_noflag"]
        assert len(r["warnings"]) == 1 and "fsdp_in_use=True" in r["warnings"][0]
        assert r["d"] == flag["d"]
        for a, b in zip(r["params"], flag["params"]):
            assert torch.equal(a, b)


def test_data_parallel_without_flag_communicates_once_and_never_warns(faults):
    want_params, want_d = fault_single()
    for rank in range(2):
        r = faults[rank]["replicated"]
        assert r["calls"] == [1] + [0] * (FAULT_STEPS - 1)  # the first step's check only
        assert r["warnings"] == []
        assert r["d"] == want_d  # local sums, exactly the single-process values
        for a, w in zip(r["params"], want_params):
            assert torch.equal(a, w)


def test_rank_with_every_group_empty_joins_the_reduction(faults):
    want_params, want_d = fault_single()
    r0, r1 = faults[0]["all_empty"], faults[1]["all_empty"]
    assert r0["d"] == r1["d"] == pytest.approx(want_d, rel=1e-12)
    for a, w in zip(r0["params"], want_params):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["fail_reduce", "fail_check"])
def test_a_rank_that_raises_before_the_collective_does_not_strand_the_other(faults, name):
    r0, r1 = faults[0][name], faults[1][name]
    assert r1["error"][0] == "RuntimeError" and "sparse" in r1["error"][1]
    assert r0["error"][0] == "RuntimeError" and "other rank(s) raised" in r0["error"][1]
    for r in (r0, r1):
        assert r["seconds"] < PG_TIMEOUT_S / 2  # nobody waited for the collective's timeout
        assert r["unchanged"]
    assert r0["d_after"] == r1["d_after"] and r0["d_after"][-1] > 1e-6  # in step again


@pytest.mark.parametrize("name,match", [("nonfinite", "non-finite"),
                                        ("overflow", "exp_avg_sq would overflow"),
                                        ("underflow", "d \\* eps")])
def test_step_rejections_are_decided_alike_on_every_rank(faults, name, match):
    import re

    for rank in range(2):
        r = faults[rank][name]
        assert r["error"] is not None and r["error"][0] == "NonFiniteStepError", (rank, r)
        assert re.search(match, r["error"][1]), r["error"][1]
        assert r["unchanged"] and r["seconds"] < PG_TIMEOUT_S / 2
