"""optimkit as kohya-ss/sd-scripts (and diffusers, HF Trainer) load it: docs/integrations.md.

sd-scripts turns ``--optimizer_type`` and ``--optimizer_args`` into an optimizer with the rule
copied below (``sd_scripts_get_optimizer``), so every command line in docs/integrations.md is
checked here through that rule, not through optimkit's own factory.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing is downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import ast  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import optimkit  # noqa: E402
from optimkit import Lookahead, Prodigy  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Copied from kohya-ss/sd-scripts, library/train_util.py, get_optimizer() at commit
# 6edbe00547bac6c2efb2d6952eb910851662cdf2 (the same rule at 0005867ba509d2e1a5674b267e8286b561c0ed71):
# the "--optimizer_args" parsing, the generic branch taken by a dotted --optimizer_type, and the
# tail (the name/args strings it logs, optimizer.train() if present). Its own names
# ("Prodigy", "DAdapt*", "AdamW", ...) are handled before the generic branch and never reach
# optimkit, so they are refused here.
_SD_SCRIPTS_OWN = ("lion", "sgdnesterov", "pagedadamw", "pagedadamw32bit", "prodigy", "adafactor", "adamw")


def sd_scripts_get_optimizer(optimizer_type, optimizer_args, learning_rate, trainable_params):
    lowered = optimizer_type.lower()
    assert lowered not in _SD_SCRIPTS_OWN and not lowered.startswith("dadapt") and not lowered.endswith("8bit")
    optimizer_kwargs = {}
    if optimizer_args is not None and len(optimizer_args) > 0:
        for arg in optimizer_args:
            key, value = arg.split("=")
            value = ast.literal_eval(value)
            optimizer_kwargs[key] = value
    lr = learning_rate
    if "." not in optimizer_type:
        optimizer_module = torch.optim
    else:
        values = optimizer_type.split(".")
        optimizer_module = importlib.import_module(".".join(values[:-1]))
        optimizer_type = values[-1]
    optimizer_class = getattr(optimizer_module, optimizer_type)
    optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)
    optimizer_name = optimizer_class.__module__ + "." + optimizer_class.__name__
    optimizer_args = ",".join([f"{k}={v}" for k, v in optimizer_kwargs.items()])
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()
    return optimizer_name, optimizer_args, optimizer


# ------------------------------------------------------------------------------ helpers
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _lora_groups(model: nn.Module, lrs=(1.0, 1.0)) -> list[dict]:
    """sd-scripts' LoRA network passes param groups: text encoder first, then U-Net."""
    return [{"params": list(model[0].parameters()), "lr": lrs[0]},
            {"params": list(model[2].parameters()), "lr": lrs[1]}]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randn(16, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_equal(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:  # the factory stores d_coef=2 as 2.0 (coerced to the annotation): equal numbers
        assert a == b and (type(a) is type(b) or {type(a), type(b)} == {int, float}), (path, a, b)


# ------------------------------------------------------------------------------ Prodigy
def test_prodigy_by_class_path_every_option_form() -> None:
    """``--optimizer_type optimkit.Prodigy --learning_rate 1.0 --optimizer_args ...``"""
    args = ["d_coef=2", "weight_decay=0.01", "use_bias_correction=True", "safeguard_warmup=True",
            "betas=(0.9,0.99)", "decouple=True", "d0=1e-5", "growth_rate=1.02"]
    model = _model()
    name, logged, opt = sd_scripts_get_optimizer("optimkit.Prodigy", args, 1.0, _lora_groups(model))
    assert type(opt) is Prodigy and name == f"{Prodigy.__module__}.Prodigy"
    assert logged == "d_coef=2,weight_decay=0.01,use_bias_correction=True,safeguard_warmup=True," \
                     "betas=(0.9, 0.99),decouple=True,d0=1e-05,growth_rate=1.02"
    for g in opt.param_groups:
        assert (g["d_coef"], g["weight_decay"], g["use_bias_correction"], g["safeguard_warmup"]) == (2, 0.01, True, True)
        assert tuple(g["betas"]) == (0.9, 0.99) and g["d0"] == 1e-5 and g["growth_rate"] == 1.02
    # the same optimizer as built by hand
    hand_model = _model()
    hand = Prodigy(_lora_groups(hand_model), lr=1.0, d_coef=2, weight_decay=0.01, use_bias_correction=True,
                   safeguard_warmup=True, betas=(0.9, 0.99), decouple=True, d0=1e-5, growth_rate=1.02)
    _train(model, opt, 5)
    _train(hand_model, hand, 5)
    _assert_equal(opt.state_dict(), hand.state_dict())
    assert opt.param_groups[0]["d"] > 1e-5  # it trained: d moved


@pytest.mark.parametrize("text, dtype", [("'bf16'", torch.bfloat16), ("'bfloat16'", torch.bfloat16)])
def test_prodigy_state_dtype_string(text, dtype) -> None:
    """``--optimizer_args "state_dtype='bf16'"``: literal_eval gives a str, not a torch.dtype."""
    model = _model()
    _, _, opt = sd_scripts_get_optimizer("optimkit.Prodigy", ["d_coef=2", f"state_dtype={text}"], 1.0,
                                         model.parameters())
    _train(model, opt, 2)
    st = opt.state[model[0].weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == dtype


def test_prodigy_float16_state_string_refused() -> None:
    """``state_dtype='float16'`` fails at construction, before training starts, saying why."""
    with pytest.raises(ValueError, match=r"Prodigy: invalid state_dtype='float16'; .*float16 state "
                       "is refused"):
        sd_scripts_get_optimizer("optimkit.Prodigy", ["state_dtype='float16'"], 1.0,
                                 _model().parameters())


def test_prodigy_warns_at_sd_scripts_default_lr() -> None:
    """Forgetting ``--learning_rate 1.0`` (sd-scripts' default lr is 2e-6) warns at construction,
    for Prodigy and for Lookahead around Prodigy; ``diagnose=False`` silences it."""
    warning = getattr(optimkit, "ProdigyDiagnosisWarning", None)
    assert warning is not None
    for otype, args in (("optimkit.Prodigy", []), ("optimkit.Lookahead", ["optimizer='prodigy'"])):
        with pytest.warns(warning, match=r"lr=2e-06 is far below 1.*--learning_rate 1\.0"):
            sd_scripts_get_optimizer(otype, args, 2e-6, _model().parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd_scripts_get_optimizer("optimkit.Prodigy", ["diagnose=False"], 2e-6, _model().parameters())


def test_prodigy_text_encoder_and_unet_lrs_need_split_groups() -> None:
    """``--unet_lr 1.0 --text_encoder_lr 0.5``: refused as prodigyopt does, unless split_groups."""
    with pytest.raises(ValueError, match="split_groups=True"):
        sd_scripts_get_optimizer("optimkit.Prodigy", [], 1.0, _lora_groups(_model(), lrs=(0.5, 1.0)))
    model = _model()
    _, _, opt = sd_scripts_get_optimizer("optimkit.Prodigy", ["split_groups=True"], 1.0,
                                         _lora_groups(model, lrs=(0.5, 1.0)))
    _train(model, opt, 5)
    d_te, d_unet = (g["d"] for g in opt.param_groups)
    assert d_te != d_unet and [g["lr"] for g in opt.param_groups] == [0.5, 1.0]


# ----------------------------------------------------------------------------- Lookahead
def test_lookahead_by_class_path_equals_wrapping_by_hand() -> None:
    """``--optimizer_type optimkit.Lookahead --optimizer_args "optimizer='prodigy'" "k=6" "d_coef=2"``"""
    model = _model()
    name, logged, opt = sd_scripts_get_optimizer(
        "optimkit.Lookahead", ["optimizer='prodigy'", "k=6", "d_coef=2"], 1.0, _lora_groups(model))
    assert type(opt) is Lookahead and type(opt.base) is Prodigy and opt.k == 6 and opt.alpha == 0.5
    assert name.endswith(".Lookahead") and logged == "optimizer=prodigy,k=6,d_coef=2"
    hand_model = _model()
    hand = Lookahead(Prodigy(_lora_groups(hand_model), lr=1.0, d_coef=2), k=6)
    _assert_equal(opt.state_dict(), hand.state_dict())
    _train(model, opt, 8)  # one synchronisation (step 6) and two steps past it
    _train(hand_model, hand, 8)
    _assert_equal(opt.state_dict(), hand.state_dict())
    assert opt.state_dict()["lookahead"]["step"] == 8 and opt.param_groups[0]["d"] > 1e-6
    for p, q in zip(model.parameters(), hand_model.parameters()):
        assert torch.equal(p, q)


def test_lookahead_by_class_path_other_bases() -> None:
    model = _model()
    _, _, opt = sd_scripts_get_optimizer(
        "optimkit.Lookahead", ["optimizer='adamw'", "alpha=0.8", "weight_decay=0.1", "betas=(0.9,0.99)"], 1e-3,
        model.parameters())
    assert type(opt.base) is optimkit.AdamW and opt.alpha == 0.8
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["lr"] == 1e-3
    _, _, opt = sd_scripts_get_optimizer(
        "optimkit.Lookahead", ["optimizer='torch.optim.RMSprop'", "optimizer_args={'alpha': 0.9}"], 1e-3,
        model.parameters())
    assert type(opt.base) is torch.optim.RMSprop and opt.param_groups[0]["alpha"] == 0.9 and opt.alpha == 0.5


@pytest.mark.parametrize("args, match", [
    (["optimizer='prodigy'", "d_coefx=2"], r"Lookahead\(optimizer='prodigy'\): Prodigy: unknown argument 'd_coefx'"),
    (["optimizer='prodigy'", "d_coef=-1"], r"Lookahead\(optimizer='prodigy'\): Prodigy: invalid d_coef=-1"),
    (["optimizer='prodigyy'"], r"Lookahead\(optimizer='prodigyy'\): unknown optimizer 'prodigyy'"),
    (["k=6"], r"Lookahead: invalid base=.*optimizer='prodigy'"),
    (["optimizer='prodigy'", "k=0"], r"Lookahead: invalid k=0"),
    (["optimizer='lookahead_adamw'"], r"Lookahead: invalid optimizer='lookahead_adamw'"),
])
def test_lookahead_by_class_path_errors(args, match) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        sd_scripts_get_optimizer("optimkit.Lookahead", args, 1.0, model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_lookahead_constructed_base_refuses_base_arguments() -> None:
    base = Prodigy(_model().parameters())
    with pytest.raises(ValueError, match=r"Lookahead: invalid lr=1.0, d_coef with a constructed base optimizer \(Prodigy\)"):
        Lookahead(base, lr=1.0, d_coef=2)  # type: ignore[call-arg]
    assert Lookahead(base, 6, 0.4).k == 6  # the positional form is unchanged


# ----------------------------------------------------------------- what the tools log
def test_d_times_lr_from_param_groups_after_scheduler() -> None:
    """docs/integrations.md: the curve sd-scripts draws for its own Prodigy, ``d * lr`` per group,
    read from ``param_groups``; ``effective_lr`` adds bias correction. Through a LambdaLR
    warm-up as sd-scripts' schedulers run it (scheduler.step() after optimizer.step())."""
    model = _model()
    _, _, opt = sd_scripts_get_optimizer("optimkit.Prodigy", ["d_coef=2"], 1.0, _lora_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    curve = []
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 6, generator=g)), torch.randn(16, 3, generator=g)).backward()
        opt.step()
        sched.step()
        curve.append([grp["d"] * grp["lr"] for grp in opt.param_groups])
    assert curve[-1][0] > curve[0][0] > 0 and all(len(c) == 2 for c in curve)
    assert sched.get_last_lr() == [grp["lr"] for grp in opt.param_groups]  # what sd-scripts logs as lr/*


def test_hf_trainer_logs_d(tmp_path) -> None:
    """The Trainer subclass of docs/integrations.md adds ``prodigy/d`` and ``prodigy/d*lr`` to every
    log (so to log_history and every reporter: a TrainerCallback's on_log runs after the
    reporting callbacks, which then miss what it adds)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class ProdigyTrainer(transformers.Trainer):
        def log(self, logs, *args, **kwargs):
            group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
            if "d" in group:
                logs["prodigy/d"] = float(group["d"])
                logs["prodigy/d*lr"] = float(group["d"]) * float(group["lr"])
            super().log(logs, *args, **kwargs)

    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (16, 8), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1.0,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ProdigyTrainer(model=model, args=args, train_dataset=data,
                                 optimizer_cls_and_kwargs=(Prodigy, {"lr": 1.0}))
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all("prodigy/d" in h and "prodigy/d*lr" in h for h in logged)
    assert logged[-1]["prodigy/d"] == trainer.optimizer.param_groups[0]["d"]


def test_diffusers_prodigy_call_pattern() -> None:
    """diffusers' DreamBooth-LoRA scripts build Prodigy with these keywords (``--optimizer prodigy``);
    optimkit.Prodigy takes the same call, so the one-line swap in docs/integrations.md works."""
    model = _model()
    params_to_optimize = [{"params": list(model[2].parameters()), "lr": 1.0},
                          {"params": list(model[0].parameters()), "weight_decay": 1e-3, "lr": 1.0}]
    opt = Prodigy(params_to_optimize, lr=1.0, betas=(0.9, 0.999), beta3=None, weight_decay=1e-4, eps=1e-8,
                  decouple=True, use_bias_correction=False, safeguard_warmup=False)
    _train(model, opt, 3)
    assert opt.param_groups[1]["weight_decay"] == 1e-3 and opt.param_groups[0]["d"] > 1e-6
    assert set(inspect.signature(Prodigy).parameters) >= {
        "lr", "betas", "beta3", "weight_decay", "eps", "decouple", "use_bias_correction", "safeguard_warmup"}


def test_onetrainer_prodigy_call_pattern() -> None:
    """OneTrainer calls prodigyopt.Prodigy with ``params=`` by keyword and these arguments."""
    model = _model()
    opt = Prodigy(params=model.parameters(), lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8,
                  weight_decay=0.0, decouple=True, use_bias_correction=False, safeguard_warmup=False,
                  d0=1e-6, d_coef=1.0, growth_rate=float("inf"), fsdp_in_use=False, slice_p=1)
    _train(model, opt, 2)
    assert opt.param_groups[0]["k"] == 2


def _docs_block(marker: str) -> str:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    after = page[page.index(marker):]
    start = after.index("```python\n") + len("```python\n")
    return after[start: after.index("```", start)]


def test_docs_logging_module_through_sd_scripts(tmp_path, monkeypatch) -> None:
    """The ``optimkit_logged.py`` of docs/integrations.md, loaded as sd-scripts loads it, writes
    ``lr/d*lr/group<i>`` to TensorBoard after every step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "optimkit_logged.py").write_text(_docs_block("<!-- optimkit_logged.py"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    logdir = tmp_path / "logs"
    model = _model()
    name, _, opt = sd_scripts_get_optimizer("optimkit_logged.Prodigy", ["d_coef=2", f"logdir={str(logdir)!r}"],
                                            1.0, _lora_groups(model))
    assert name == "optimkit_logged.Prodigy" and isinstance(opt, Prodigy)
    _train(model, opt, 4)
    opt.writer.flush()
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert {"lr/d*lr/group0", "lr/d*lr/group1", "lr/effective_lr/group0"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("lr/d*lr/group1")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert events[-1].value == pytest.approx(opt.param_groups[1]["d"] * opt.param_groups[1]["lr"])
    sys.modules.pop("optimkit_logged", None)
