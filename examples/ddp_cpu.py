"""Train with an optimkit optimizer on 2 CPU processes: DDP, ZeRO or FSDP2 over gloo.

Runs anywhere (no GPU, no download: scikit-learn's bundled 8x8 digits). Either let the script
start its own 2 processes::

    python examples/ddp_cpu.py                              # DDP + Prodigy
    python examples/ddp_cpu.py --wrapper zero --optimizer adamw
    python examples/ddp_cpu.py --wrapper fsdp2 --optimizer prodigy --steps 200

or launch it with torchrun, which sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT::

    torchrun --standalone --nproc-per-node 2 examples/ddp_cpu.py --wrapper zero

Each rank trains on its half of every batch; at the end the script checks that every rank
holds the same parameters (and, for Prodigy, the same d) and prints the held-out accuracy.
See docs/distributed.md for the same three wrappers on GPUs.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import optimkit


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def wrap(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model as the wrapper wants it, and the optimizer over its parameters."""
    name = args.optimizer
    spec = optimkit.get_spec(name)
    if args.wrapper == "ddp":
        # Every rank holds every parameter and the averaged gradient: a plain optimizer.
        model = nn.parallel.DistributedDataParallel(model)
        return model, optimkit.create_optimizer(name, model.parameters(), lr=args.lr)
    if args.wrapper == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = nn.parallel.DistributedDataParallel(model)
        kwargs: dict[str, Any] = dict(spec.preset)
        if args.lr is not None:
            kwargs["lr"] = args.lr
        if spec.cls is optimkit.Prodigy:
            # each rank steps only its shard of the parameters: all-reduce d's statistics
            kwargs["fsdp_in_use"] = True
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=spec.cls, **kwargs)
    if args.wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)  # parameters become DTensors, sharded on dim 0 across the ranks
        # Prodigy detects DTensor parameters and all-reduces d's statistics by itself.
        return model, optimkit.create_optimizer(name, model.parameters(), lr=args.lr)
    raise ValueError(f"unknown wrapper {args.wrapper!r}; expected ddp, zero or fsdp2")


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    x, y, x_test, y_test = load_digits()
    model, opt = wrap(build_model(), args)
    g = torch.Generator().manual_seed(0)  # the same batches on every rank; each takes a slice
    per = args.batch // world
    for step in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)[rank * per:(rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            d = opt.param_groups[0].get("d")
            print(f"step {step:4d}  loss {loss.item():.4f}" + (f"  d {d:.3e}" if d is not None else ""))

    # Every rank must end with the same model (and the same Prodigy d).
    flat = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in model.parameters()])
    d = float(opt.param_groups[0].get("d", 0.0))
    mine = torch.cat([flat, torch.tensor([d])])
    all_ranks = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(all_ranks, mine)
    same = all(torch.equal(all_ranks[0], t) for t in all_ranks[1:])
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"{args.wrapper} + {args.optimizer}: test accuracy {acc:.3f}; "
              f"ranks identical: {same}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit("ranks diverged")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    train(rank, world, args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wrapper", choices=("ddp", "zero", "fsdp2"), default="ddp")
    p.add_argument("--optimizer", default="prodigy", help=f"one of {optimkit.list_optimizers()}")
    p.add_argument("--lr", type=float, default=None, help="default: the registry's")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="global batch, split across ranks")
    p.add_argument("--nprocs", type=int, default=2, help="processes to spawn without torchrun")
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun: one process per rank already
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    with socket.socket() as s:  # a free port for this job's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nprocs, port, args), nprocs=args.nprocs)


if __name__ == "__main__":
    main()
