"""create_optimizer, parse_optimizer_args and param_groups: every parsing edge case, every error."""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import optimkit
from optimkit import Lookahead, create_optimizer, param_groups, parse_optimizer_args
from optimkit.factory.registry import REGISTRY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add wake-up latency under load
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text_encoder = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
        self.conv = nn.Conv1d(4, 4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(idx)  # (B, L, 4)
        h = self.conv(h.transpose(1, 2))
        h = self.gn(self.bn(h)).transpose(1, 2)
        h = self.rms(h + self.pos_embed[: h.shape[1]])
        return self.head(self.frozen(h)).mean(1)


def _step(opt: torch.optim.Optimizer, model: nn.Module, n: int = 1) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        idx = torch.randint(0, 10, (8, 3), generator=g)
        opt.zero_grad()
        model(idx).pow(2).mean().backward()
        opt.step()


# ======================================================================= parse_optimizer_args
@pytest.mark.parametrize("args, expected", [
    (None, {}),
    ([], {}),
    ("", {}),
    ({}, {}),
    (["d_coef=2", "decouple=True", "use_bias_correction=True"],
     {"d_coef": 2, "decouple": True, "use_bias_correction": True}),
    ("d_coef=2, decouple=True", {"d_coef": 2, "decouple": True}),
    ("  d_coef  =  2  ,decouple=  true ", {"d_coef": 2, "decouple": True}),
    (["weight_decay = 0.01 "], {"weight_decay": 0.01}),
    # booleans and None, any case
    ("a=TRUE, b=False, c=fAlSe, d=None, e=NONE, f=null", {"a": True, "b": False, "c": False, "d": None,
                                                          "e": None, "f": None}),
    # numbers
    ("a=1, b=-2, c=+3, d=1e-3, e=1E-3, f=.5, g=5., h=-1.5e+2",
     {"a": 1, "b": -2, "c": 3, "d": 1e-3, "e": 1e-3, "f": 0.5, "g": 5.0, "h": -150.0}),
    # tuples: bare, parenthesised, bracketed, trailing comma, nested, in a list item
    (["betas=0.9,0.99"], {"betas": (0.9, 0.99)}),
    (["betas=(0.9, 0.99)"], {"betas": (0.9, 0.99)}),
    (["betas = ( 0.9 ,0.99 ) "], {"betas": (0.9, 0.99)}),
    (["betas=[0.9,0.99]"], {"betas": [0.9, 0.99]}),
    (["betas=(0.9,)"], {"betas": (0.9,)}),
    (["x=((1,2),(3,4))"], {"x": ((1, 2), (3, 4))}),
    (["x=()"], {"x": ()}),
    # the comma conflict: a comma starts a new argument only if `key=` follows it
    ("betas=0.9,0.99, eps=1e-8", {"betas": (0.9, 0.99), "eps": 1e-8}),
    ("betas=(0.9,0.99),eps=1e-8,d_coef=2", {"betas": (0.9, 0.99), "eps": 1e-8, "d_coef": 2}),
    ("lr=1,betas=0.9,0.99,0.5,eps=1", {"lr": 1, "betas": (0.9, 0.99, 0.5), "eps": 1}),
    (["a=1, b=2", "c=3"], {"a": 1, "b": 2, "c": 3}),
    ("a=1, word", {"a": (1, "word")}),  # no `key=` after the comma: it belongs to the value
    # stray separators are noise
    ("a=1,", {"a": 1}),
    ("a=1,,b=2,", {"a": 1, "b": 2}),
    (["", "  ", "a=1"], {"a": 1}),
    # values containing '=' (only the first '=' separates) and quoted strings
    (["expr=a=b"], {"expr": "a=b"}),
    (["s='x, y=z'"], {"s": "x, y=z"}),
    ('s="quoted", t=word', {"s": "quoted", "t": "word"}),
    (["pullback_momentum=reset"], {"pullback_momentum": "reset"}),
    # a dict passes through (keys stripped; values used as given)
    ({" lr ": "1e-3", "betas": (0.9, 0.99)}, {"lr": "1e-3", "betas": (0.9, 0.99)}),
])
def test_parse_optimizer_args(args, expected) -> None:
    got = parse_optimizer_args(args)
    assert got == expected
    for k, v in expected.items():
        assert type(got[k]) is type(v), k  # 2 stays int, 2.0 float, True bool


def test_parse_inf_nan() -> None:
    got = parse_optimizer_args("a=inf, b=-inf, c=+inf, d=Infinity, e=nan, f=-INF, g=NaN")
    assert got["a"] == got["c"] == got["d"] == math.inf and got["b"] == got["f"] == -math.inf
    assert math.isnan(got["e"]) and math.isnan(got["g"])


def test_parse_does_not_evaluate() -> None:
    marker = "optimkit_test_marker_module"
    for text in [f"x=__import__('{marker}')", "x=exec('1')", "x=(lambda: 1)()", "x=1+1"]:
        try:
            value = parse_optimizer_args([text])["x"]
        except ValueError:
            continue
        assert isinstance(value, str)  # kept as text, never run
    assert marker not in sys.modules
    assert parse_optimizer_args(["x=1+1"]) == {"x": "1+1"}


@pytest.mark.parametrize("args, match", [
    (["d_coef"], r"expected 'key=value', got 'd_coef'"),
    (["=3"], r"invalid argument name ''"),
    (["1a=3"], r"invalid argument name '1a'"),
    (["my-arg=3"], r"invalid argument name 'my-arg'"),
    (["a="], r"argument 'a' has an empty value"),
    (["a=  "], r"argument 'a' has an empty value"),
    (["a=(1,2"], r"unbalanced brackets"),
    (["a=1,2)"], r"unbalanced brackets"),
    (["a='x"], r"unterminated quote"),
    (["a=(1,,2)"], r"argument 'a': empty element"),
    (["a=1", "a=2"], r"argument 'a' given twice"),
    ("a=1, a=2", r"argument 'a' given twice"),
    ({"a b": 1}, r"invalid argument name 'a b'"),
    ({1: 1}, r"invalid argument name 1"),
])
def test_parse_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_optimizer_args(args)


def test_parse_type_errors() -> None:
    with pytest.raises(TypeError, match="list of 'key=value' strings"):
        parse_optimizer_args(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected 'key=value' strings, got 3"):
        parse_optimizer_args(["a=1", 3])  # type: ignore[list-item]


# ======================================================================== create_optimizer
def test_names_case_insensitive_and_aliases() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    for name in ("AdamW", "ADAMW", " adamw ", "adam_w"):
        assert type(create_optimizer(name, params)) is optimkit.AdamW
    opt = create_optimizer("SGDNesterov", params)
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    assert create_optimizer("momentum", params).param_groups[0]["momentum"] == 0.9
    # the user overrides a preset explicitly
    assert create_optimizer("momentum", params, momentum=0.5).param_groups[0]["momentum"] == 0.5


def test_lr_defaults_and_explicit() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    for name, spec in REGISTRY.items():
        assert create_optimizer(name, params).param_groups[0]["lr"] == spec.default_lr
    assert create_optimizer("adam", params, lr=3e-4).param_groups[0]["lr"] == 3e-4
    assert create_optimizer("adam", params, optimizer_args=["lr=3e-4"]).param_groups[0]["lr"] == 3e-4
    # a class path gets the class's own default
    assert create_optimizer("torch.optim.SGD", params).param_groups[0]["lr"] == 1e-3
    lr_t = torch.tensor(0.01)
    assert create_optimizer("adam", params, lr=lr_t).param_groups[0]["lr"] is lr_t


def test_coercion_to_the_signature_types() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = create_optimizer("adam", params, lr=1, optimizer_args={"betas": [0, 0.99], "eps": "1e-6", "amsgrad": "true"})
    g = opt.param_groups[0]
    assert type(g["lr"]) is float and g["lr"] == 1.0
    assert g["betas"] == (0.0, 0.99) and all(type(b) is float for b in g["betas"])
    assert g["eps"] == 1e-6 and g["amsgrad"] is True
    opt = create_optimizer("prodigy", params, optimizer_args="slice_p=2.0, beta3=none, growth_rate=inf")
    g = opt.param_groups[0]
    assert g["slice_p"] == 2 and type(g["slice_p"]) is int and g["beta3"] is None and g["growth_rate"] == math.inf
    # an unannotated int default (prodigyopt's weight_decay=0) accepts a float and keeps ints
    opt = create_optimizer("prodigyopt.Prodigy", params, optimizer_args="weight_decay=0.01, slice_p=2")
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["slice_p"] == 2


@pytest.mark.parametrize("name, kwargs, match", [
    ("adam", dict(betas=0.9), r"Adam: invalid betas=0.9; expected a tuple of 2 numbers"),
    ("adam", dict(betas=(0.9, 0.99, 0.5)), r"Adam: invalid betas=\(0.9, 0.99, 0.5\); expected a tuple of 2"),
    ("adam", dict(betas=("a", 0.9)), r"Adam: invalid betas\[0\]='a'; expected a number"),
    ("adam", dict(eps="small"), r"Adam: invalid eps='small'; expected a number"),
    ("adam", dict(eps=True), r"Adam: invalid eps=True; expected a number"),
    ("adam", dict(amsgrad=1), r"Adam: invalid amsgrad=1; expected True or False"),
    ("sgd", dict(nesterov="yes"), r"SGD: invalid nesterov='yes'; expected True or False"),
    ("prodigy", dict(slice_p=2.5), r"Prodigy: invalid slice_p=2.5; expected an integer"),
    ("prodigy", dict(nonfinite=3), r"Prodigy: invalid nonfinite=3; expected a string"),
    ("sgd", dict(lr=None, momentum=None), r"SGD: invalid momentum=None"),
    ("adam", dict(lr="fast"), r"Adam: invalid lr='fast'; expected a number or a tensor"),
    # ranges: the optimizers' own validation, naming the argument
    ("adam", dict(betas=(0.9, 1.0)), r"Adam: invalid betas\[1\]=1.0; expected 0 <= betas\[1\] < 1"),
    ("sgd", dict(lr=-1), r"SGD: invalid lr=-1.0"),
    ("rmsprop", dict(alpha=-0.5), r"RMSprop: invalid alpha=-0.5"),
    ("prodigy", dict(nonfinite="ignore"), r"Prodigy: invalid nonfinite='ignore'"),
    ("nesterov", dict(momentum=0), r"invalid nesterov=True; expected momentum > 0"),
])
def test_type_and_range_errors_name_the_argument(name, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        create_optimizer(name, [nn.Parameter(torch.zeros(3))], **kwargs)


def test_unknown_name_suggests_and_lists() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'\. Did you mean 'adamw'.*Valid names: adadelta, adagrad"):
        create_optimizer("adamww", params)
    with pytest.raises(ValueError, match=r"unknown optimizer 'lookahead_adamx'\. Did you mean"):
        create_optimizer("lookahead_adamx", params)
    with pytest.raises(ValueError, match="non-empty string"):
        create_optimizer("  ", params)


def test_unknown_argument_suggests_and_lists() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"SGD: unknown argument 'momentun'\. Did you mean 'momentum'\? Valid arguments: .*nesterov"):
        create_optimizer("sgd", params, momentun=0.9)
    with pytest.raises(ValueError, match=r"Prodigy: unknown argument 'dcoef'\. Did you mean 'd_coef'"):
        create_optimizer("prodigy", params, optimizer_args=["dcoef=2"])
    # Lookahead's arguments exist only for lookahead_ names: never dropped silently elsewhere
    with pytest.raises(ValueError, match=r"Adam: unknown argument 'k'"):
        create_optimizer("adam", params, optimizer_args="k=5")
    with pytest.raises(ValueError, match=r"unknown argument 'kk'.*lookahead_k"):
        create_optimizer("lookahead_adam", params, optimizer_args="kk=5")


def test_given_twice_raises() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"\['eps'\] given both in optimizer_args and as keywords"):
        create_optimizer("adam", params, optimizer_args="eps=1e-6", eps=1e-7)
    with pytest.raises(ValueError, match="lr given twice"):
        create_optimizer("adam", params, lr=1e-3, optimizer_args="lr=1e-4")
    with pytest.raises(ValueError, match="given twice"):
        create_optimizer("lookahead_adam", params, optimizer_args="k=5, lookahead_k=6")


def test_dotted_class_paths() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = create_optimizer("torch.optim.NAdam", params, lr=1e-3, optimizer_args="momentum_decay=0.005")
    assert type(opt) is torch.optim.NAdam and opt.param_groups[0]["momentum_decay"] == 0.005
    import prodigyopt

    opt = create_optimizer("prodigyopt.Prodigy", params, optimizer_args=["d_coef=2", "decouple=False"])
    assert type(opt) is prodigyopt.Prodigy and opt.param_groups[0]["d_coef"] == 2.0
    assert opt.param_groups[0]["decouple"] is False
    assert type(create_optimizer("optimkit.Prodigy", params)) is optimkit.Prodigy
    assert type(create_optimizer(torch.optim.Adamax, params)) is torch.optim.Adamax
    opt = create_optimizer("lookahead_torch.optim.SGD", params, lr=0.1, optimizer_args="alpha=0.3")
    assert isinstance(opt, Lookahead) and type(opt.base) is torch.optim.SGD and opt.alpha == 0.3


def test_user_module_class_path(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "optimkit_test_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch

        class MyOpt(torch.optim.SGD):
            def __init__(self, params, lr=0.01, my_factor: float = 1.0, flag=False):
                super().__init__(params, lr=lr * my_factor)
                self.my_factor, self.flag = my_factor, flag
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    params = [nn.Parameter(torch.zeros(3))]
    opt = create_optimizer("optimkit_test_userpkg.MyOpt", params, optimizer_args=["my_factor=2", "flag=TRUE"])
    assert opt.my_factor == 2.0 and type(opt.my_factor) is float and opt.flag is True
    assert opt.param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match=r"MyOpt: unknown argument 'my_facto'\. Did you mean 'my_factor'"):
        create_optimizer("optimkit_test_userpkg.MyOpt", params, my_facto=2)


@pytest.mark.parametrize("path, match", [
    ("no_such_module_xyz.Opt", r"cannot import module 'no_such_module_xyz'"),
    ("torch.optim.Nadam", r"module 'torch.optim' has no optimizer class 'Nadam'\. Did you mean 'torch.optim.NAdam'"),
    ("torch.nn.Linear", r"'torch.nn.Linear' is not a torch.optim.Optimizer subclass"),
    ("math.pi", r"'math.pi' is not a torch.optim.Optimizer subclass"),
    ("optimkit.Lookahead", r"is a wrapper.*'lookahead_'"),
    (".Adam", r"invalid optimizer class path"),
])
def test_dotted_path_errors(path, match) -> None:
    with pytest.raises(ValueError, match=match):
        create_optimizer(path, [nn.Parameter(torch.zeros(3))])


def test_lookahead_prefix_and_its_args() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = create_optimizer("Lookahead_AdamW", params, optimizer_args="k=3, alpha=0.8, pullback_momentum=reset")
    assert isinstance(opt, Lookahead) and type(opt.base) is optimkit.AdamW
    assert (opt.k, opt.alpha, opt.pullback_momentum) == (3, 0.8, "reset")
    # dict input with text values is coerced too
    opt = create_optimizer("lookahead_sgd", params, optimizer_args={"k": "4", "alpha": "0.25"})
    assert opt.k == 4 and type(opt.k) is int and opt.alpha == 0.25
    # RMSprop has its own `alpha`: the plain name goes to RMSprop, lookahead_alpha to the wrapper
    opt = create_optimizer("lookahead_rmsprop", params, optimizer_args="alpha=0.9, lookahead_alpha=0.3")
    assert opt.param_groups[0]["alpha"] == 0.9 and opt.alpha == 0.3
    with pytest.raises(ValueError, match=r"Lookahead: invalid k=0"):
        create_optimizer("lookahead_sgd", params, optimizer_args="k=0")
    with pytest.raises(ValueError, match=r"Lookahead: invalid k=2.5; expected an integer"):
        create_optimizer("lookahead_sgd", params, optimizer_args="k=2.5")
    with pytest.raises(ValueError, match=r"Lookahead: invalid pullback_momentum='back'"):
        create_optimizer("lookahead_sgd", params, optimizer_args="pullback_momentum=back")


def test_module_builds_param_groups() -> None:
    model = Net()
    opt = create_optimizer("adamw", model, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert decayed == {id(model.conv.weight), id(model.head.weight), id(model.text_encoder[0].weight),
                       id(model.pos_embed)}
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    # no weight_decay given: the class default (AdamW 0.01) on the decayed group
    opt = create_optimizer("adamw", model)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    _step(opt, model, 2)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer("adam", nn.Linear(2, 2).requires_grad_(False))


def sd_scripts_get_optimizer(optimizer_type: str, optimizer_args: list[str], trainable_params, lr: float):
    """sd-scripts' path for an optimizer it does not know by name (library/train_util.py):
    the type is split at the last dot, the module imported, the class taken with getattr, and
    ``optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)`` called. The only change:
    the ``key=value`` strings go through our parser instead of ``ast.literal_eval``."""
    optimizer_kwargs = parse_optimizer_args(optimizer_args)
    values = optimizer_type.split(".")
    optimizer_module = importlib.import_module(".".join(values[:-1]))
    optimizer_class = getattr(optimizer_module, values[-1])
    return optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)


def test_sd_scripts_convention_prodigy() -> None:
    """``--optimizer_type optimkit.Prodigy --optimizer_args "d_coef=2" "decouple=True"
    "use_bias_correction=True"``, loaded the way sd-scripts loads it."""
    model = nn.Linear(4, 2)
    try:
        opt = sd_scripts_get_optimizer("optimkit.Prodigy", ["d_coef=2", "decouple=True", "use_bias_correction=True",
                                                             "betas=0.9,0.99", "weight_decay=0.01"],
                                       model.parameters(), lr=1.0)
    except NotImplementedError:
        pytest.skip("optimkit.Prodigy not implemented yet")
    assert type(opt) is optimkit.Prodigy
    g = opt.param_groups[0]
    assert g["d_coef"] == 2 and g["decouple"] is True and g["use_bias_correction"] is True
    assert g["betas"] == (0.9, 0.99) and g["weight_decay"] == 0.01 and g["lr"] == 1.0
    # and the same through create_optimizer, which also checks the names
    opt2 = create_optimizer("optimkit.Prodigy", model.parameters(), lr=1.0,
                            optimizer_args=["d_coef=2", "decouple=True", "use_bias_correction=True"])
    assert opt2.param_groups[0]["d_coef"] == 2.0 and opt2.param_groups[0]["use_bias_correction"] is True
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ============================================================================ schedulers
def _train_with_scheduler(opt, model, sched, steps):
    lrs, moms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, 10, (8, 3), generator=g)
            opt.zero_grad()
            model(idx).pow(2).mean().backward()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            moms.append(opt.param_groups[0]["betas"][0] if "betas" in opt.param_groups[0] else None)
    return lrs, moms


@pytest.mark.parametrize("name", ["adamw", "lookahead_adamw"])
def test_cosine_annealing(name) -> None:
    model = Net()
    opt = create_optimizer(name, model, lr=1e-2)
    T = 12
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=1e-4)
    lrs, _ = _train_with_scheduler(opt, model, sched, T)
    expected = [1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * t / T)) / 2 for t in range(1, T + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    base = opt.base if isinstance(opt, Lookahead) else opt
    assert all(g["lr"] == pytest.approx(expected[-1]) for g in base.param_groups)


@pytest.mark.parametrize("name", ["adam", "lookahead_adam"])
def test_one_cycle(name) -> None:
    model = Net()
    opt = create_optimizer(name, model, lr=1e-3)
    steps = 19
    # total 20, pct_start 0.3: lr rises for 0.3 * 20 - 1 = 5 steps, then anneals to step 19
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps + 1, pct_start=0.3,
                                                anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 25)  # starts at max_lr / div_factor
    lrs, moms = _train_with_scheduler(opt, model, sched, steps)
    peak = max(range(steps), key=lambda i: lrs[i])
    assert lrs[peak] == pytest.approx(1e-2) and peak == 4  # lrs[i] is the lr after i + 1 steps
    assert lrs[-1] == pytest.approx(1e-2 / 25 / 1e4)
    # OneCycleLR cycles beta1 inversely to the lr (it reads 'betas' from optimizer.defaults)
    assert moms[peak] == pytest.approx(0.85) and moms[-1] > 0.94
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_state_and_lookahead_counter_together() -> None:
    model = Net()
    opt = create_optimizer("lookahead_momentum", model, lr=0.05, optimizer_args="k=4")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _train_with_scheduler(opt, model, sched, 7)
    assert opt._lookahead_step == 7 and opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


# ========================================================================== param_groups
def _group_of(groups, p):
    hits = [g for g in groups if any(q is p for q in g["params"])]
    assert len(hits) == 1
    return hits[0]


def test_param_groups_no_decay_rules() -> None:
    model = Net()
    groups = param_groups(model, weight_decay=0.1)
    # biases, every norm type's weights and 1-D params: 0; 2-D+ weights: 0.1
    for m in (model.text_encoder[1], model.bn, model.gn, model.rms):
        for p in m.parameters():
            assert _group_of(groups, p)["weight_decay"] == 0.0
    for p in (model.conv.bias, model.head.bias):
        assert _group_of(groups, p)["weight_decay"] == 0.0
    for p in (model.conv.weight, model.head.weight, model.text_encoder[0].weight, model.pos_embed):
        assert _group_of(groups, p)["weight_decay"] == 0.1
    # every trainable parameter exactly once, frozen ones never, no empty groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert id(model.frozen.weight) not in ids and all(g["params"] for g in groups)
    assert len(groups) == 2


def test_param_groups_norm_detected_by_type_not_name() -> None:
    model = nn.Sequential()
    model.add_module("a", nn.Linear(3, 3))
    model.add_module("b", nn.LayerNorm(3))  # name says nothing about norms
    groups = param_groups(model, weight_decay=0.1, no_decay=(), no_decay_1d=False)
    assert _group_of(groups, model.b.weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.a.bias)["weight_decay"] == 0.1  # 1-D rule and patterns off
    groups = param_groups(model, weight_decay=0.1, no_decay=("a.*",), no_decay_1d=False)
    assert all(g["weight_decay"] == 0.0 for g in groups) and len(groups) == 1


def test_param_groups_name_patterns() -> None:
    model = Net()
    groups = param_groups(model, weight_decay=0.1, no_decay=("bias", "norm", "pos_embed", "*.0.weight"))
    assert _group_of(groups, model.pos_embed)["weight_decay"] == 0.0
    assert _group_of(groups, model.text_encoder[0].weight)["weight_decay"] == 0.0  # fnmatch pattern
    assert _group_of(groups, model.head.weight)["weight_decay"] == 0.1
    groups = param_groups(model, weight_decay=0.1, no_decay="POS_EMBED")  # case-insensitive, one string
    assert _group_of(groups, model.pos_embed)["weight_decay"] == 0.0


def test_param_groups_lr_scales() -> None:
    model = Net()
    groups = param_groups(model, weight_decay=0.1, lr_scales={"text_encoder.*": 0.5, "head.weight": 2.0},
                          base_lr=1e-3)
    assert _group_of(groups, model.text_encoder[0].weight)["lr"] == 5e-4
    assert _group_of(groups, model.text_encoder[1].weight)["lr"] == 5e-4
    assert _group_of(groups, model.text_encoder[1].weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.head.weight)["lr"] == 2e-3
    assert _group_of(groups, model.conv.weight)["lr"] == 1e-3
    # groups: (decay, 1) (decay, .5) (no-decay, .5) (no-decay, 1) (decay, 2): none empty
    assert len(groups) == 5 and all(g["params"] for g in groups)
    # first matching pattern wins
    groups = param_groups(model, lr_scales={"text_encoder.0.*": 0.1, "text_encoder.*": 0.5}, base_lr=1.0)
    assert _group_of(groups, model.text_encoder[0].weight)["lr"] == 0.1
    assert _group_of(groups, model.text_encoder[1].weight)["lr"] == 0.5
    # usable by any optimizer
    opt = torch.optim.AdamW(groups, lr=1e-2)
    _step(opt, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_param_groups_weight_decay_none_inherits() -> None:
    model = nn.Linear(3, 3)
    groups = param_groups(model)
    assert "weight_decay" not in _group_of(groups, model.weight)
    assert _group_of(groups, model.bias)["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.2)
    assert _group_of(opt.param_groups, model.weight)["weight_decay"] == 0.2


def test_param_groups_shared_parameters_once() -> None:
    enc = nn.Linear(3, 3)
    model = nn.Sequential(enc, nn.Tanh(), enc)
    groups = param_groups(model, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == 2


class _TinyViT(nn.Module):
    """timm's convention: ``no_weight_decay()`` returns names of parameters (``pos_embed``,
    ``cls_token``, as timm's VisionTransformer), possibly of modules (XCiT's ``pos_embeder``)
    or wildcard patterns, and may list names the model lacks (``dist_token``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embeder = nn.Linear(8, 8)  # a module named by no_weight_decay()
        self.pos_embeder_extra = nn.Linear(8, 8)  # shares the prefix, not the module path
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.rel_pos = nn.ModuleList([_RelPos(), _RelPos()])
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "pos_embeder", "blocks.*.weight"}


class _RelPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5, 2))
        self.proj = nn.Parameter(torch.zeros(2, 2))

    def no_weight_decay(self):
        return ["table"]  # relative to this module: rel_pos.0.table, rel_pos.1.table


def test_param_groups_honour_the_models_no_weight_decay() -> None:
    model = _TinyViT()
    groups = param_groups(model, weight_decay=0.1)
    undecayed = {n for n, p in model.named_parameters() if _group_of(groups, p)["weight_decay"] == 0.0}
    assert undecayed == {
        "pos_embed", "cls_token",  # exact names (3-D: only the declaration exempts them)
        "pos_embeder.weight", "pos_embeder.bias",  # a module path covers its parameters
        "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias",  # a pattern; biases are 1-D
        "rel_pos.0.table", "rel_pos.1.table",  # a submodule's names, relative to it
        "pos_embeder_extra.bias", "head.bias",  # 1-D
    }
    assert _group_of(groups, model.pos_embeder_extra.weight)["weight_decay"] == 0.1  # not a module path
    assert _group_of(groups, model.rel_pos[0].proj)["weight_decay"] == 0.1
    # create_optimizer builds its groups with param_groups: the declaration reaches the optimizer
    opt = create_optimizer("adamw", model, weight_decay=0.1)
    assert _group_of(opt.param_groups, model.pos_embed)["weight_decay"] == 0.0
    assert _group_of(opt.param_groups, model.head.weight)["weight_decay"] == 0.1
    # opt-out
    groups = param_groups(model, weight_decay=0.1, model_no_weight_decay=False)
    assert _group_of(groups, model.pos_embed)["weight_decay"] == 0.1
    assert _group_of(groups, model.rel_pos[0].table)["weight_decay"] == 0.1


@pytest.mark.parametrize("returned, match", [
    ("pos_embed", r"_Bad.no_weight_decay\(\) must return a collection of parameter names, got str"),
    (None, r"got NoneType"),
    ({"pos_embed", 3}, r"returned 3; expected parameter names"),
])
def test_param_groups_no_weight_decay_must_return_names(returned, match) -> None:
    class _Bad(nn.Linear):
        def no_weight_decay(self):
            return returned

    with pytest.raises(TypeError, match=match):
        param_groups(_Bad(2, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_scales={"nothing.*": 0.5}, base_lr=1.0), r"pattern\(s\) \['nothing\.\*'\] match no trainable"),
    (dict(lr_scales={"frozen.*": 0.5}, base_lr=1.0), r"match no trainable"),
    (dict(lr_scales={"text_encoder.*": 0.5}), r"lr_scales needs base_lr"),
    (dict(lr_scales={"text_encoder.*": -1.0}, base_lr=1.0), r"invalid lr scale 'text_encoder.\*': -1.0"),
    (dict(weight_decay=-0.1), r"invalid weight_decay=-0.1"),
])
def test_param_groups_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(Net(), **kwargs)


def test_param_groups_type_and_empty_errors() -> None:
    with pytest.raises(TypeError, match="expected an nn.Module"):
        param_groups([nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False))


def test_two_arguments_in_one_item_are_refused_with_the_fix():
    """``"weight_decay=0.01 decouple=True"`` (one sd-scripts item with a space): refused,
    naming both keys and how to write them, instead of ``weight_decay='0.01 decouple=True'``
    failing later as "expected a number"."""
    from optimkit.factory.args import parse_optimizer_args

    with pytest.raises(ValueError, match=r"holds two arguments \(weight_decay=\.\.\. and "
                       r"decouple=\.\.\.\); separate them with a comma"):
        parse_optimizer_args(["weight_decay=0.01 decouple=True"])
    assert parse_optimizer_args(["weight_decay=0.01, decouple=True"]) == {
        "weight_decay": 0.01, "decouple": True}
    assert parse_optimizer_args(["name='a b=c'"]) == {"name": "a b=c"}  # quoted: kept
