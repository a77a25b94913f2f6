"""Where users train: optimkit inside the real Hugging Face Trainer, Lightning and accelerate.

Each test trains a tiny model on CPU, checkpoints part-way with the library's own
checkpointing, resumes from that checkpoint in a fresh trainer / optimizer, and requires the
resumed run to equal the uninterrupted one bit for bit (every parameter, the logged losses, the
optimizer state). The libraries come with ``pip install optimkit[integration]`` (``make test``
installs it); a test whose library is missing is skipped with a one-line reason.

No downloads: models are built from a config with random weights, data are made in memory,
and the Hugging Face hub is switched off (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``).
"""

from __future__ import annotations

import os

# before any Hugging Face import: they read these when imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import optimkit  # noqa: E402

_MISSING = "not installed (pip install 'optimkit[integration]')"


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        # the libraries' advice for real runs (dataloader workers, GPU availability, ...)
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(n)


def _assert_state_dicts_equal(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _assert_state_dicts_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_dicts_equal(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ================================================================ Hugging Face Trainer
HF_STEPS, HF_CUT = 10, 6  # save_steps=6: the checkpoint to resume from is checkpoint-6


def _hf_case(kind: str, how: str, out: str, resume: str | None = None):
    """Train a 2-layer GPT-2 (hidden 16) for HF_STEPS steps, checkpointing every HF_CUT."""
    transformers = pytest.importorskip("transformers", reason=f"transformers {_MISSING}")
    pytest.importorskip("accelerate", reason=f"accelerate {_MISSING} (the Trainer needs it)")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)  # random weights from the config: no download
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (24, 8), generator=g)]
    lr = 1.0 if kind == "prodigy" else 1e-2
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=HF_STEPS, per_device_train_batch_size=4, learning_rate=lr,
        weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps",
        save_steps=HF_CUT, logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    cls = optimkit.Prodigy if kind == "prodigy" else optimkit.AdamW
    kwargs = {"lr": lr, "weight_decay": 0.01}
    if how == "optimizers":  # a constructed optimizer and scheduler
        opt = cls(optimkit.param_groups(model, weight_decay=0.01), **kwargs)
        sched = transformers.get_cosine_schedule_with_warmup(opt, 2, HF_STEPS)
        extra = {"optimizers": (opt, sched)}
    else:  # the Trainer builds it over its own decay / no-decay groups
        extra = {"optimizer_cls_and_kwargs": (cls, kwargs)}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, **extra)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert type(opt) is cls
    return model, losses, opt


@pytest.mark.parametrize("kind, how", [
    ("adamw", "optimizers"), ("adamw", "optimizer_cls_and_kwargs"),
    ("prodigy", "optimizers"), ("prodigy", "optimizer_cls_and_kwargs"),
])
def test_hf_trainer_resume_equals_uninterrupted(kind, how, tmp_path) -> None:
    full, full_losses, full_opt = _hf_case(kind, how, str(tmp_path / "full"))
    ckpt = tmp_path / "full" / f"checkpoint-{HF_CUT}"
    assert (ckpt / "optimizer.pt").is_file()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # as the Trainer loads it
    # the warm-up's first step has lr 0, which Prodigy (like prodigyopt) does not count
    steps_taken = HF_CUT - 1 if kind == "prodigy" else HF_CUT
    assert {int(st["step"]) for st in saved["state"].values()} == {steps_taken}
    resumed, losses, opt = _hf_case(kind, how, str(tmp_path / "resumed"), resume=str(ckpt))
    assert sorted(losses) == list(range(1, HF_STEPS + 1))
    for step in range(HF_CUT + 1, HF_STEPS + 1):  # logged by the resumed run itself
        assert losses[step] == full_losses[step], step
    assert len(set(full_losses.values())) > 1  # training moved
    _assert_same_params(resumed, full)
    _assert_state_dicts_equal(opt.state_dict(), full_opt.state_dict())
    if kind == "prodigy":
        assert opt.param_groups[0]["d"] == full_opt.param_groups[0]["d"] > 1e-6  # d grew and resumed


# ======================================================================== Lightning
def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason=f"lightning {_MISSING}")
    return pl


PL_EPOCHS, PL_BATCHES, PL_K = 4, 3, 4  # 12 steps, syncs at 4, 8, 12; epoch ends at 3, 6, 9


def _pl_fit(pl, ckpt_dir, epochs, ckpt_path=None):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(PL_BATCHES * 8, 4, generator=g), torch.randn(PL_BATCHES * 8, 1, generator=g)
    torch.manual_seed(0)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, _):
            xb, yb = batch
            return ((self.net(xb) - yb) ** 2).mean()

        def configure_optimizers(self):
            return optimkit.Lookahead(optimkit.AdamW(self.parameters(), lr=1e-2), k=PL_K, alpha=0.5,
                                      pullback_momentum="pullback")

        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False, num_workers=0)

    module = Module()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer.optimizers[0]


def _no_slow_keys_in_base(la: optimkit.Lookahead) -> None:
    for p, st in la.base.state.items():
        assert not set(st) & {"slow_param", "slow_momentum"}, sorted(st)
    for p in la._slow:
        assert la.state[p]["slow_param"] is la._slow[p]["slow_param"]


def test_lightning_lookahead_resume_equals_uninterrupted(tmp_path) -> None:
    """Lightning restores an optimizer with ``load_state_dict`` and then moves its state with
    ``_optimizer_to_device``, writing every entry of ``optimizer.state[p]`` back. Lookahead's
    slow weights (seen through that view) used to land in the base optimizer's state that way,
    and from there in every later checkpoint. Here: resume, then resume again from a checkpoint
    the resumed run wrote."""
    pl = _lightning()
    full, full_opt = _pl_fit(pl, tmp_path / "full", PL_EPOCHS)
    assert isinstance(full_opt, optimkit.Lookahead) and full_opt._lookahead_step == PL_EPOCHS * PL_BATCHES
    # epoch=1.ckpt: after 6 steps, between two syncs (the step counter must survive)
    resumed, opt = _pl_fit(pl, tmp_path / "resumed", PL_EPOCHS, ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    _assert_same_params(resumed, full)
    _assert_state_dicts_equal(opt.state_dict(), full_opt.state_dict())
    _no_slow_keys_in_base(opt)
    written = torch.load(tmp_path / "resumed" / "epoch=2.ckpt", weights_only=True)["optimizer_states"][0]
    assert all(not set(st) & {"slow_param", "slow_momentum"} for st in written["state"].values())
    assert set(written["lookahead"]["slow_state"][0]) == {"slow_param", "slow_momentum"}
    # a checkpoint written by a resumed run resumes too
    again, opt2 = _pl_fit(pl, tmp_path / "again", PL_EPOCHS, ckpt_path=tmp_path / "resumed" / "epoch=2.ckpt")
    _assert_same_params(again, full)
    _assert_state_dicts_equal(opt2.state_dict(), full_opt.state_dict())
    _no_slow_keys_in_base(opt2)


# ======================================================================== accelerate
def _acc_run(accelerate, flat, batches, save_dir=None, load_dir=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 2))
    acc = accelerate.Accelerator(cpu=True)
    opt = optimkit.AdamW(optimkit.param_groups(model, weight_decay=0.05), lr=1e-2, flat=flat)
    model, opt = acc.prepare(model, opt)
    saved = None
    if load_dir is not None:
        acc.load_state(load_dir)
    for i, (x, y) in enumerate(batches):
        if save_dir is not None and i == len(batches) // 2:
            acc.save_state(save_dir)
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        acc.backward(((model(x) - y) ** 2).mean())
        opt.step()
    return model, opt, saved


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
def test_accelerate_save_load_state_equals_uninterrupted(flat, tmp_path) -> None:
    """``save_state`` writes the model with safetensors, which refuses or drops tensors that
    share storage; ``flat=True`` makes every parameter a view of one buffer. Every weight must
    come back intact and the optimizer must keep stepping the loaded parameters."""
    accelerate = pytest.importorskip("accelerate", reason=f"accelerate {_MISSING}")
    pytest.importorskip("safetensors", reason=f"safetensors {_MISSING}")
    g = torch.Generator().manual_seed(0)
    batches = list(zip(torch.randn(10, 8, 6, generator=g), torch.randn(10, 8, 2, generator=g)))
    full, full_opt, saved = _acc_run(accelerate, flat, batches, save_dir=tmp_path / "state")
    assert (tmp_path / "state" / "model.safetensors").is_file()

    torch.manual_seed(123)  # the loaded state, not this seed, must decide the weights
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 2))
    acc = accelerate.Accelerator(cpu=True)
    opt = optimkit.AdamW(optimkit.param_groups(model, weight_decay=0.05), lr=1e-2, flat=flat)
    model, opt = acc.prepare(model, opt)
    acc.load_state(tmp_path / "state")
    loaded = dict(model.named_parameters())
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():  # every weight intact after load
        assert torch.equal(loaded[name], value), name
    for x, y in batches[len(batches) // 2:]:
        opt.zero_grad()
        acc.backward(((model(x) - y) ** 2).mean())
        opt.step()
    _assert_same_params(model, full)
    _assert_state_dicts_equal(opt.state_dict(), full_opt.state_dict())
