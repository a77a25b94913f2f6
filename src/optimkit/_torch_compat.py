"""The only module that touches private torch APIs.

torch exposes its multi-tensor (``torch._foreach_*``) and fused (``torch._fused_*_``) kernels
only as underscored functions. Keeping every such reference here means a torch upgrade that
renames one breaks exactly one file, and the optimizer modules read as plain math.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

# -- multi-tensor ops ----------------------------------------------------------------------
foreach_add_ = torch._foreach_add_
foreach_add = torch._foreach_add
foreach_addcdiv_ = torch._foreach_addcdiv_
foreach_addcmul_ = torch._foreach_addcmul_
foreach_addcmul = torch._foreach_addcmul
foreach_div_ = torch._foreach_div_
foreach_div = torch._foreach_div
foreach_lerp_ = torch._foreach_lerp_
foreach_maximum_ = torch._foreach_maximum_
foreach_mul_ = torch._foreach_mul_
foreach_mul = torch._foreach_mul
foreach_neg = torch._foreach_neg
foreach_sqrt = torch._foreach_sqrt
foreach_sqrt_ = torch._foreach_sqrt_
foreach_sub_ = torch._foreach_sub_
foreach_sub = torch._foreach_sub
foreach_copy_ = torch._foreach_copy_
foreach_norm = torch._foreach_norm
foreach_abs = torch._foreach_abs

# -- code torch.compile must not trace -------------------------------------------------------
def not_traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, which ``torch.compile`` never traces: a compiled ``opt.step()`` that reaches it
    breaks its graph there and runs ``fn`` eagerly, exactly as without compile.

    The one place optimkit keeps code out of dynamo's graphs, for two kinds of code:

    * torch's fused kernels (below). Every optimkit path that runs one (SGD, Adagrad, Adam(W),
      the mapped steps of RMSprop and RAdam, Prodigy's phase 2) calls it through these names.
      Traced, they fail: torch 2.13 has no fake (meta) kernel for ``_fused_sgd_`` and
      ``_fused_adagrad_``, and ``_fused_adam_`` given one step tensor shared by the list or a
      ``grad_scale`` trips a functionalization assert. torch.optim keeps kernels out of its
      graphs the same way (``_disable_dynamo_if_unsupported``).
    * math that branches in Python on this step's host values (RAdam's rectification switches
      on at ``rho_t > 5``): traced, dynamo specializes on every step counter value, i.e.
      compiles again at every step.

    Why the fused kernels are not swapped for a traced foreach path under compile (the policy
    in ``_impl`` is the same compiled or not): the eager kernel computes exactly what it
    computes without compile (the compiled step matches the eager one bit for bit), it is
    already single-pass at the bandwidth floor on CPU, and nothing per tensor is traced, so
    compiling stays cheap. Measured here (1 thread, 16 tensors, 2.1M params; compiled step /
    eager step / first two compiles): Adam with the kernel outside the graph 5.6 / 4.8 ms /
    14 + 4.5 s; Adam's foreach path traced 31 ms / 15 + 3 s (its step counters are read on the
    host inside the bucket loop, so dynamo runs most of that function eagerly, op by op);
    SGD-momentum 6.8 ms / 10 s outside vs 7.2 ms / 28 s traced (host-sync free, fully
    compiled, and no faster).

    A Python ``fn`` runs wholly eagerly (``recursive=True``: nothing it calls is compiled,
    and dynamo does not even look at its frame again at each call; measured on a tiny RAdam
    foreach step: 2.7 ms compiled with ``recursive=False`` vs 1.0 ms, eager 0.9 ms). A kernel
    (a builtin) gets the lighter ``recursive=False`` wrapper: its frame is never compiled,
    which matters when code dynamo already runs eagerly calls it (traced, the wrapper would
    guard on every float argument, e.g. RAdam's per-step lr: a recompile per step); in eager
    mode it costs one Python call (~1.5 us; the recursive wrapper ~5 us).

    Without importing dynamo (``import optimkit`` would cost ~2 s more than ``import torch``;
    see "Import cost" in docs/performance.md): a Python ``fn`` gets torch's own lazy form of
    the same wrapper, ``torch._disable_dynamo`` (what torch.optim's steps use). It builds
    ``torch.compiler.disable(fn)`` at its first call and calls that; its own frame lies in a
    module dynamo never traces (``torch._compile``), so a compiled step breaks its graph at
    the call and runs ``fn`` eagerly with dynamo off, as before. Any other callable (a
    builtin) is wrapped at once, as before (nothing in optimkit passes one).
    """
    if isinstance(fn, types.FunctionType):
        return torch._disable_dynamo(fn, recursive=True)
    return torch.compiler.disable(fn, recursive=False)


# -- torch's fused single-pass kernels (CPU and CUDA) ---------------------------------------
#: CPU tensors with fewer elements run torch's fused kernels on one thread (the value of
#: ATen's ``GRAIN_SIZE``, below which its elementwise ops never go parallel); the reason and
#: the measurements are in ``optimkit._impl`` ("Small tensors and parallel regions").
SERIAL_BELOW_NUMEL = 32768


def serial_for_small(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` (a ``torch._fused_*_`` op taking per-tensor lists first), with its small CPU
    tensors stepped on one thread.

    torch's fused CPU kernels split every tensor over the intra-op threads with grain size 0:
    one OpenMP parallel region per tensor, whatever its size. Tensors below
    :data:`SERIAL_BELOW_NUMEL` run in a call made under ``torch.set_num_threads(1)`` (a parallel
    region then runs inline on the calling thread), larger ones in a second call with the
    caller's threads. The kernel splits each tensor at cache-line-aligned boundaries and the
    per-element math does not depend on the split, so the results are bit-identical to one
    call on all threads; every list argument as long as the first is split the same way."""

    def run(*args: Any, **kwargs: Any) -> Any:
        tensors = args[0]
        if not tensors or not tensors[0].is_cpu:
            return kernel(*args, **kwargs)
        threads = torch.get_num_threads()
        if threads == 1:
            return kernel(*args, **kwargs)
        small = [t.numel() < SERIAL_BELOW_NUMEL for t in tensors]
        n_small = sum(small)
        if n_small == 0:
            return kernel(*args, **kwargs)
        if n_small < len(small):
            n = len(small)

            def part(keep: bool) -> tuple[list[Any], dict[str, Any]]:
                def cut(a: Any) -> Any:
                    if isinstance(a, (list, tuple)) and len(a) == n:
                        return [x for x, s in zip(a, small) if s == keep]
                    return a
                return [cut(a) for a in args], {k: cut(v) for k, v in kwargs.items()}

            big_args, big_kwargs = part(False)
            kernel(*big_args, **big_kwargs)
            args_t, kwargs_d = part(True)
            args, kwargs = tuple(args_t), kwargs_d
        torch.set_num_threads(1)  # ~0.5 us for the pair, measured here
        try:
            return kernel(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one intra-op thread (``torch.set_num_threads(1)``), restoring the
    caller's count after, also on an exception. ATen then opens no OpenMP parallel region:
    every ``parallel_for`` runs inline on the calling thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: ``fused_adam_`` etc.: torch's fused kernel behind :func:`serial_for_small`, kept out of
#: dynamo's graphs as :func:`not_traced` keeps a builtin: the light ``recursive=False`` wrapper
#: (~1.5 us a call; the recursive one ~5 us). The splitter's frame is never compiled (no guards
#: on its float arguments, so no recompiles) and what it calls is a builtin, which runs eagerly.
_FUSED_KERNELS = {
    "fused_adam_": "_fused_adam_",
    "fused_adamw_": "_fused_adamw_",
    "fused_sgd_": "_fused_sgd_",
    "fused_adagrad_": "_fused_adagrad_",
}
_serial: dict[str, Callable[..., Any]] = {}

if TYPE_CHECKING:
    fused_adam_: Callable[..., Any]
    fused_adamw_: Callable[..., Any]
    fused_sgd_: Callable[..., Any]
    fused_adagrad_: Callable[..., Any]
else:
    def __getattr__(name: str) -> Any:
        """``fused_adam_`` & co., made on first use: wrapping at import imported dynamo (~2 s).

        Once ``torch._dynamo`` is imported (``torch.compile`` imports it, and so does
        constructing any ``torch.optim.Optimizer``: its ``add_param_group``), the first access
        builds the ``torch.compiler.disable(..., recursive=False)`` wrapper and stores it as a
        module global: from then on every access, traced or not, finds the same object as
        when it was made at import. Dynamo reads an attribute missing from a module's
        ``__dict__`` with a real ``getattr`` (this function runs, untraced), so a first access
        inside a compiled step also stores and sees the wrapper. Before dynamo is imported
        nothing can trace the call, so the splitter is returned bare (not stored: the next
        access checks again)."""
        kernel = _FUSED_KERNELS.get(name)
        if kernel is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        run = _serial.get(name)
        if run is None:
            run = _serial[name] = serial_for_small(getattr(torch, kernel))
        if "torch._dynamo" not in sys.modules:
            return run
        wrapped = torch.compiler.disable(run, recursive=False)
        globals()[name] = wrapped
        return wrapped

    def __dir__() -> list[str]:
        return sorted({*globals(), *_FUSED_KERNELS})


#: device types on which torch ships the fused kernels above
FUSED_DEVICE_TYPES = ("cpu", "cuda")
#: dtypes the fused kernels accept
FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_adam_unit_step(device: torch.device) -> Tensor:
    """A step counter at which torch's fused Adam kernels apply no bias correction.

    RMSprop, RAdam and Prodigy run their update through ``fused_adam_`` / ``fused_adamw_``
    with the bias corrections folded into lr (or absent); at step 2**100 every
    ``1 - beta**step`` is exactly 1 for any beta < 1 in double precision. The CPU kernel reads
    its counters on the host, the CUDA one as float32 on the device; one tensor can serve
    every parameter of a call.
    """
    return torch.tensor(2.0**100, dtype=torch.float32,
                        device=None if device.type == "cpu" else device)


def increment_steps(steps: list[Tensor]) -> None:
    """t <- t + 1 for a list of 0-dim ``step`` counters, in place."""
    if all(map(_IS_CPU, steps)):
        # A tensor scalar keeps CPU foreach on its fast overload (a Python 1 is re-wrapped
        # into a tensor once per counter).
        foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        foreach_add_(steps, 1.0)


_IS_CPU = operator.attrgetter("is_cpu")


def scalar_dtype() -> torch.dtype:
    """dtype torch.optim uses for its 0-dim ``step`` counters (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def fused_supported(tensors: Sequence[Tensor]) -> bool:
    """True when torch's fused kernels accept every tensor (device type and dtype)."""
    # Exact types only: tensor subclasses such as DTensor (FSDP2's sharded parameters) report
    # isinstance(t, nn.Parameter) but have no sharding rule for the fused ops.
    exact = (torch.Tensor, torch.nn.Parameter)
    return all(
        type(t) in exact and t.dtype in FUSED_DTYPES and t.device.type in FUSED_DEVICE_TYPES
        and not t.is_sparse
        for t in tensors
    )
