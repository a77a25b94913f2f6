"""``import optimkit`` does not import dynamo, and what dynamo sees is unchanged by that.

``torch.compiler.disable`` imports ``torch._dynamo`` (~2 s on a small CPU, more than half of
``import torch``), so ``_torch_compat`` wraps its fused kernels on first use and
``not_traced`` wraps lazily (docs/performance.md, "Import cost"). Each check runs in a fresh
interpreter: in this one, dynamo is long imported. Nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON object last."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_optimkit_does_not_import_dynamo():
    out = _fresh("""
        import json, sys
        import optimkit
        import optimkit.cli
        from optimkit import _torch_compat as tc
        tc.fused_sgd_  # no dynamo yet: the bare kernel, and still no import
        print(json.dumps({"dynamo": "torch._dynamo" in sys.modules,
                          "dtensor": "torch.distributed.tensor" in sys.modules}))
    """)
    # (torch.distributed.tensor, for Prodigy's DTensor support, pulls in sympy: ~1 s)
    assert out == {"dynamo": False, "dtensor": False}


@pytest.mark.slow
def test_kernels_first_reached_inside_a_compiled_function_stay_out_of_the_graph():
    """dynamo imported, no fused kernel touched yet: the first ``tc.fused_sgd_`` is read while
    dynamo traces. Traced, ``_fused_sgd_`` fails (no fake kernel); the wrapper keeps it out,
    is stored once, and a ``not_traced`` function runs with dynamo off."""
    out = _fresh("""
        import json, sys
        import torch
        import optimkit
        from optimkit import _torch_compat as tc

        assert "torch._dynamo" not in sys.modules
        import torch._dynamo
        assert "fused_sgd_" not in vars(tc)

        def sgd(p, g):
            tc.fused_sgd_([p], [g], [], weight_decay=0.0, momentum=0.0, lr=0.5, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False,
                          grad_scale=None, found_inf=None)
            return p * 1

        @tc.not_traced
        def probe(x):
            return torch.compiler.is_compiling(), x + 1

        def f(x):
            return probe(x * 2)

        p, g = torch.ones(4), torch.full((4,), 2.0)
        y = torch.compile(sgd, backend="eager")(p, g)
        k = tc.fused_sgd_
        flag, z = torch.compile(f, backend="eager")(torch.ones(2))
        print(json.dumps({
            "y": y.tolist(),
            "stored": vars(tc).get("fused_sgd_") is k and tc.fused_sgd_ is k,
            "disabled": bool(getattr(k, "_torchdynamo_disable", False)),
            "probe_compiling": flag, "z": z.tolist(),
        }))
    """)
    assert out == {"y": [0.0] * 4, "stored": True, "disabled": True,
                   "probe_compiling": False, "z": [3.0, 3.0]}
