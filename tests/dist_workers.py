"""Multi-process workers for tests/test_distributed.py (importable so ``spawn`` can pickle them).

One ``launch`` starts a 2-rank gloo job on CPU (MASTER_ADDR=127.0.0.1, a free port) that runs
several *scenarios* one after the other in the same process group, and writes what each rank
saw (final parameters, Prodigy's ``d`` after every step, errors) to ``<outdir>/rank<r>.pt``
after every scenario, so a hang in a late scenario does not lose the earlier results. The
parent process enforces a hard wall-clock limit: a job still running at the deadline is killed
and reported as a timeout, never left hanging.

The same model, data and training loop serve the single-process reference runs
(``train_single``), which the tests compare the distributed runs against.

Scenarios (each over a list of optimizer case names):

``ddp``         DistributedDataParallel + an optimkit optimizer, half the batch per rank.
``ddp_flat``    the same with ``flat=True``.
``zero``        DDP + ``ZeroRedundancyOptimizer(optimizer_class=optimkit.X)``; Prodigy gets
                ``fsdp_in_use=True`` so its d statistics are all-reduced over the shards.
``zero_noreduce`` Prodigy under ZeRO *without* ``fsdp_in_use``: records per-rank d and the
                warnings (Prodigy detects the sharding at the first step, warns, and reduces).
``zero_ckpt``   ZeRO run interrupted at ``HALF``: ``consolidate_state_dict`` + ``torch.save`` on
                rank 0, a fresh model/optimizer on every rank loads it and finishes the run.
``zero_nograd`` ZeRO where every parameter owned by rank 1 gets no gradient for a few steps
                (rank 1's local optimizer has nothing to step but must still join Prodigy's
                reduction).
``fsdp2``       ``torch.distributed.fsdp.fully_shard`` (DTensor parameters, Shard(0)).
``fsdp2_ckpt``  FSDP2 run interrupted at ``HALF``, saved and resumed with
                ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import optimkit

WORLD = 2
STEPS = 50
HALF = 25
BATCH = 64  # full batch; each rank takes BATCH // WORLD rows
NOGRAD_STEPS = range(10, 14)  # steps where rank 1's ZeRO shard gets no gradient
PG_TIMEOUT_S = 30  # gloo collectives give up (raise) after this long
# float64: the distributed runs reduce gradients in a different order than one process does;
# in float32 that rounding (1e-7 relative) is amplified by Prodigy's tiny effective eps
# (d * eps) to ~5e-4 in some weights after 50 steps even in a single process that merely
# averages two half-batch gradients. In float64 the same runs agree to ~1e-12, so a real
# distributed error cannot hide under the tolerance.
DTYPE = torch.float64


def case_names() -> list[str]:
    """Every optimizer in optimkit's registry, in the registry's order."""
    from optimkit.factory.registry import REGISTRY

    return list(REGISTRY)


def optimizer_spec(name: str) -> tuple[type, dict[str, Any]]:
    """(class, constructor kwargs) of a registry name: what ZeroRedundancyOptimizer takes."""
    spec = optimkit.get_spec(name)
    return spec.cls, {**spec.preset, "lr": spec.default_lr if spec.default_lr is not None else 1e-3}


def is_prodigy(name: str) -> bool:
    return optimizer_spec(name)[0] is optimkit.Prodigy


def make_optimizer(name: str, params: Iterable, **extra: Any) -> torch.optim.Optimizer:
    """The registry's optimizer at its default learning rate, as a user would build it."""
    return optimkit.create_optimizer(name, params, lr=optimizer_spec(name)[1]["lr"], **extra)


# ----------------------------------------------------------------------------- model, data
class DigitsMLP(nn.Module):
    """64 -> 32 -> 10 tanh MLP on 8x8 digits (2,420 params). ``gain`` has a single row, so
    FSDP2's Shard(0) leaves rank 1 an empty local shard of it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(64, 32, dtype=DTYPE)
        self.l2 = nn.Linear(32, 10, dtype=DTYPE)
        self.gain = nn.Parameter(torch.ones(1, 10, dtype=DTYPE))
        with torch.no_grad():
            for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE) * 0.3)
            self.gain.add_(torch.randn(self.gain.shape, generator=g, dtype=DTYPE) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) * self.gain


def save_digits(path: str) -> None:
    """Write scikit-learn's bundled digits (real data, no download) for the workers."""
    from sklearn.datasets import load_digits

    d = load_digits()
    torch.save({"x": torch.tensor(d.data, dtype=DTYPE) / 16.0,
                "y": torch.tensor(d.target, dtype=torch.long)}, path)


def batch_indices(steps: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, n, (BATCH,), generator=g) for _ in range(steps)]


def train(
    model: nn.Module, opt: torch.optim.Optimizer, data: dict[str, torch.Tensor],
    start: int, stop: int, rank: int, world: int,
    drop: Callable[[int], Iterable[torch.Tensor]] | None = None,
) -> list[float]:
    """Steps ``start..stop-1``; rank r uses rows [r*B/world, (r+1)*B/world) of each batch, so the
    ranks' averaged gradient is the full-batch gradient. ``drop(t)`` lists parameters whose
    gradient is removed (set to None) at step t. Returns group 0's ``d`` after each step (or [])."""
    idx_all = batch_indices(stop, data["x"].shape[0])
    per = BATCH // world
    ds: list[float] = []
    for t in range(start, stop):
        idx = idx_all[t][rank * per:(rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data["x"][idx]), data["y"][idx]).backward()
        if drop is not None:
            for p in drop(t):
                p.grad = None
        opt.step()
        d = opt.param_groups[0].get("d")
        if d is not None:
            ds.append(float(d))
    return ds


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        p = p.detach()
        if hasattr(p, "full_tensor"):  # DTensor (FSDP2): gather the whole parameter
            p = p.full_tensor()
        out[n.replace("module.", "")] = p.clone()
    return out


def state_of(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """This rank's optimizer state, by parameter name: per-parameter entries (local shards for
    DTensors, as this rank holds them) and every param-group value except ``params``."""
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer: this rank's local optimizer
    names = {id(p): n.replace("module.", "") for n, p in model.named_parameters()}
    out: dict[str, Any] = {}
    for p, st in inner.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
            out[f"{names[id(p)]}.{k}"] = v
    for i, g in enumerate(opt.param_groups):
        for k, v in g.items():
            if k not in ("params", "param_names"):
                out[f"group{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def train_single(name: str, data: dict[str, torch.Tensor], drop_names: Iterable[str] = (),
                 drop_steps: Iterable[int] = ()) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The single-process reference: the same model and full batches, one optimizer."""
    model = DigitsMLP()
    opt = make_optimizer(name, model.parameters())
    named = dict(model.named_parameters())
    drop_set, drop_steps = [named[n] for n in drop_names], set(drop_steps)
    ds = train(model, opt, data, 0, STEPS, 0, 1,
               drop=(lambda t: drop_set if t in drop_steps else ()))
    return params_of(model), ds


# ----------------------------------------------------------------------------- scenarios
def _ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


def _zero(params: Iterable, name: str, *, reduce: bool = True) -> torch.optim.Optimizer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kw = optimizer_spec(name)
    if is_prodigy(name) and reduce:
        # Each rank steps only its shard: Prodigy's global d needs its sums over all shards.
        kw["fsdp_in_use"] = True
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)


def _zero_info(zero: Any) -> dict[str, Any]:
    local = [p for g in zero.optim.param_groups for p in g["params"]]
    return {"local_numel": sum(p.numel() for p in local),
            "state_numel": sum(p.numel() for p in zero.optim.state if zero.optim.state[p]),
            "total_numel": sum(p.numel() for g in zero.param_groups for p in g["params"])}


def _fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # One FSDP group for the whole (small) model: one all-gather and one reduce-scatter per
    # step. Every parameter is still a DTensor sharded on dim 0 across the ranks.
    fully_shard(model)
    return model


def run_scenario(scenario: str, name: str, data: dict, rank: int, world: int, tmp: str) -> dict:
    import torch.distributed as dist

    out: dict[str, Any] = {}
    if scenario in ("ddp", "ddp_flat"):
        model = DigitsMLP()
        ddp = _ddp(model)
        # ddp_flat: flat=True after DDP is built (it re-points p.data and p.grad into flat
        # buffers; DDP copies its reduced buckets into the existing p.grad tensors)
        opt = make_optimizer(name, ddp.parameters(), **({"flat": True} if scenario == "ddp_flat" else {}))
        out["d"] = train(ddp, opt, data, 0, STEPS, rank, world)
        out["params"] = params_of(model)
    elif scenario in ("zero", "zero_noreduce"):
        model = DigitsMLP()
        ddp = _ddp(model)
        zero = _zero(ddp.parameters(), name, reduce=scenario == "zero")
        steps = STEPS if scenario == "zero" else 10
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["d"] = train(ddp, zero, data, 0, steps, rank, world)
        out["warnings"] = [str(w.message) for w in caught if "fsdp_in_use" in str(w.message)]
        out["params"] = params_of(model)
        out["state"] = state_of(zero, model)
        out.update(_zero_info(zero))
    elif scenario == "zero_ckpt":
        path = os.path.join(tmp, f"zero_{name}.pt")
        model = DigitsMLP()
        ddp = _ddp(model)
        zero = _zero(ddp.parameters(), name)
        d1 = train(ddp, zero, data, 0, HALF, rank, world)
        zero.consolidate_state_dict(to=0)  # a collective: every rank calls it
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": zero.state_dict()}, path)
        dist.barrier()
        del model, ddp, zero
        model = DigitsMLP(seed=1)  # different weights: the checkpoint must overwrite them
        ddp = _ddp(model)
        zero = _zero(ddp.parameters(), name)
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        zero.load_state_dict(ckpt["optim"])
        out["d"] = d1 + train(ddp, zero, data, HALF, STEPS, rank, world)
        out["params"] = params_of(model)
        out["state"] = state_of(zero, model)
    elif scenario == "zero_nograd":
        model = DigitsMLP()
        ddp = _ddp(model)
        zero = _zero(ddp.parameters(), name)
        mine = {id(p) for g in zero.optim.param_groups for p in g["params"]}
        local_names = [n for n, p in model.named_parameters() if id(p) in mine]
        owners: list[Any] = [None] * world
        dist.all_gather_object(owners, local_names)
        named = dict(model.named_parameters())
        rank1 = [named[n] for n in owners[1]]
        out["dropped"] = list(owners[1])
        out["d"] = train(ddp, zero, data, 0, STEPS, rank, world,
                         drop=lambda t: rank1 if t in NOGRAD_STEPS else ())
        out["params"] = params_of(model)
    elif scenario == "fsdp2":
        model = _fsdp2(DigitsMLP())
        opt = make_optimizer(name, model.parameters())
        out["d"] = train(model, opt, data, 0, STEPS, rank, world)
        out["params"] = params_of(model)
        out["state"] = state_of(opt, model)
        out["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    elif scenario == "fsdp2_ckpt":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt_dir = os.path.join(tmp, f"fsdp2_{name}")
        model = _fsdp2(DigitsMLP())
        opt = make_optimizer(name, model.parameters())
        d1 = train(model, opt, data, 0, HALF, rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        del model, opt, msd, osd
        model = _fsdp2(DigitsMLP(seed=1))
        opt = make_optimizer(name, model.parameters())
        # get_state_dict allocates the optimizer state (a zero-lr step) for dcp.load to fill
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        out["d"] = d1 + train(model, opt, data, HALF, STEPS, rank, world)
        out["params"] = params_of(model)
        out["state"] = state_of(opt, model)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return out


def _worker(rank: int, world: int, port: int, plan: list[tuple[str, list[str]]], outdir: str) -> None:
    import torch.distributed as dist

    # Children write to log files, not the test's terminal; failures show the log's tail.
    log = open(os.path.join(outdir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    data = torch.load(os.path.join(outdir, "digits.pt"), weights_only=True)
    results: dict[str, dict[str, Any]] = {}
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        for scenario, names in plan:
            results[scenario] = {}
            for name in names:
                t0 = time.perf_counter()
                try:
                    res = run_scenario(scenario, name, data, rank, world, outdir)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # noqa: B036 - dcp's CheckpointException is a BaseException
                    res = {"error": traceback.format_exc()}
                res["seconds"] = time.perf_counter() - t0
                results[scenario][name] = res
                print(f"rank {rank}: {scenario}/{name} {res['seconds']:.2f}s "
                      f"{'error' if 'error' in res else 'ok'}", flush=True)
                torch.save(results, path + ".tmp")
                os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: list[tuple[str, list[str]]], outdir: str, timeout: float) -> tuple[list[dict], str | None]:
    """Run ``plan`` on 2 spawned gloo ranks; past ``timeout`` seconds the job is killed.

    Returns (each rank's results ``{scenario: {case: result}}``, job error or None). The error
    says why the job did not finish cleanly (timeout, a rank that raised or died) with the tail
    of the ranks' logs; results hold whatever each rank had written before that.
    """
    import torch.multiprocessing as mp

    if not os.path.exists(os.path.join(outdir, "digits.pt")):
        save_digits(os.path.join(outdir, "digits.pt"))
    ctx = mp.start_processes(_worker, args=(WORLD, free_port(), plan, outdir), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    error = None
    try:
        while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                error = f"distributed job still running after {timeout:.0f}s (hang); killed"
                break
    except Exception as e:  # a rank raised or died: join() reports it
        error = f"distributed job failed: {type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:  # only the processes this call started
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for r in range(WORLD):
        path = os.path.join(outdir, f"rank{r}.pt")
        results.append(torch.load(path, weights_only=True) if os.path.exists(path) else {})
    if error is not None:
        error += "\n" + log_tail(outdir)
    return results, error


def log_tail(outdir: str, n: int = 2000) -> str:
    parts = []
    for r in range(WORLD):
        p = os.path.join(outdir, f"rank{r}.log")
        if os.path.exists(p):
            parts.append(f"--- rank {r} log (tail) ---\n" + open(p).read()[-n:])
    return "\n".join(parts)
