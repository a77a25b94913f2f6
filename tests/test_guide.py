"""optimkit recommend / explain: rules reference the registry, advice is buildable and right."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimkit.cli import main
from optimkit.compare import BUILTIN_TASKS
from optimkit.factory import REGISTRY, create_optimizer, get_spec
from optimkit.guide.explain import default_text, render_index, render_markdown, render_text
from optimkit.guide.recommend import Traits, recommend, render_recommendations, spec_string
from optimkit.guide.rules import CORRECTIONS, RULES, TRAITS


def test_rules_reference_registry_names_and_documented_hyperparams():
    for rule in RULES:
        spec = get_spec(rule.optimizer)
        assert spec.name == rule.optimizer, f"use the canonical name, not {rule.optimizer!r}"
        documented = {hp.name for hp in spec.hyperparams}
        assert set(rule.hyperparams) <= documented, (rule.optimizer, set(rule.hyperparams) - documented)
        for key, value in rule.when.items():
            assert key in TRAITS and value in TRAITS[key], rule
        for task in rule.evidence:
            assert task in BUILTIN_TASKS, task
    assert set(CORRECTIONS) <= set(REGISTRY)


ALL_TRAITS = [
    Traits(model=m, sparse=s, data_size=d, memory_tight=mt, no_tuning=nt, fine_tune=ft)
    for m, s, d, mt, nt, ft in itertools.product(
        (None, "cnn", "transformer", "rnn", "gan", "linear", "mlp"), (False, True), (None, "small", "large"),
        (False, True), (False, True), (False, True))
]


def test_every_recommendation_builds():
    """Each recommended starting point is a valid constructor call (checked by the optimizer)."""
    seen = set()
    for traits in ALL_TRAITS:
        recs = recommend(traits, top=3)
        assert recs, traits
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
        for r in recs:
            key = (r.optimizer, tuple(sorted(r.hyperparams.items())))
            if key in seen:
                continue
            seen.add(key)
            create_optimizer(r.optimizer, [torch.nn.Parameter(torch.zeros(3))], optimizer_args=dict(r.hyperparams))
            # and the printed spec string parses back to the same arguments
            from optimkit.compare import parse_optimizer_choice

            choice = parse_optimizer_choice(spec_string(r.optimizer, r.hyperparams))
            assert choice.args == {k: v for k, v in r.hyperparams.items() if k != "lr"}
            assert choice.lr == pytest.approx(r.hyperparams["lr"])


def test_recommendations_follow_the_traits():
    top = recommend(Traits(sparse=True))[0]
    assert top.optimizer == "adagrad" and "docbow" in top.evidence
    assert recommend(Traits(model="transformer"))[0].optimizer == "adamw"
    nt = recommend(Traits(no_tuning=True))[0]
    assert nt.optimizer == "prodigy" and nt.hyperparams["lr"] == 1.0
    mem = recommend(Traits(memory_tight=True))[0]
    assert get_spec(mem.optimizer).state_buffers <= 1
    gan = next(r for r in recommend(Traits(model="gan")) if r.optimizer == "adam")
    assert gan.hyperparams["betas"] == (0.5, 0.999)
    cnn = recommend(Traits(model="cnn"))[0]
    assert cnn.optimizer in ("nesterov", "momentum") and cnn.hyperparams["lr"] == 0.1


def test_corrections_popular_guides_get_wrong():
    prodigy = CORRECTIONS["prodigy"]
    assert "lr=1.0" in prodigy and "d_coef" in prodigy and "LARGER d_coef" in prodigy and "more aggressive" in prodigy
    assert "decoupled" in CORRECTIONS["adamw"] and "L2" in CORRECTIONS["adamw"]
    assert "default 1.0" in CORRECTIONS["adadelta"]
    # every Prodigy rule keeps lr at 1.0
    assert all(r.hyperparams.get("lr", 1.0) == 1.0 for r in RULES if r.optimizer == "prodigy")


def test_recommend_cli_text(capsys):
    assert main(["recommend", "--no-tuning", "--model", "linear", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Recommendations for: model=linear, no-tuning")
    assert "1. prodigy" in out and "3. " not in out
    backed = [l for l in out.splitlines() if "backed by optimkit compare task(s):" in l]
    assert backed and "logreg" in backed[0]
    assert "LARGER d_coef" in out
    assert "Avoid here:" in out


def test_recommend_cli_json(capsys):
    import json

    assert main(["recommend", "--sparse", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["optimizer"] == "adagrad" and data[0]["spec"].startswith("adagrad:lr=")


def test_recommend_render_mentions_memory():
    recs = recommend(Traits(memory_tight=True))
    text = render_recommendations(Traits(memory_tight=True), recs)
    assert f"{4 * get_spec(recs[0].optimizer).state_buffers} bytes/param" in text


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_explain_lists_every_hyperparam(name, capsys):
    spec = REGISTRY[name]
    assert main(["explain", name]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # (lines are wrapped to the terminal's width)
    assert out.startswith(f"{name}: ") and flat.startswith(" ".join(f"{name}: {spec.description}".split()))
    for hp in spec.hyperparams:
        assert " ".join(f"{hp.name} = {default_text(hp.default)}    valid: {hp.valid}".split()) in flat
    assert " ".join(spec.update_rule.splitlines()[0].split()) in flat
    md = render_markdown(spec)
    for hp in spec.hyperparams:
        assert f"| `{hp.name}` |" in md
    assert render_text(spec) == out


def test_explain_alias_and_unknown(capsys):
    assert main(["explain", "NAG"]) == 0
    assert capsys.readouterr().out.startswith("nesterov:")
    assert main(["explain", "adamz"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown optimizer 'adamz'" in err


def test_explain_adadelta_has_an_lr(capsys):
    main(["explain", "adadelta"])
    out = capsys.readouterr().out
    assert "  lr = 1    valid:" in out and "it has one (lr, default 1.0)" in out


def test_index_lists_every_optimizer():
    idx = render_index()
    for name in REGISTRY:
        assert f"[{name}]({name}.md)" in idx


# ------------------------------------------------------------- AMSGrad: text == computation
def _adam_rule_as_documented(grads, lr, b1, b2, eps, wd, decoupled, amsgrad):
    """The registry's Adam/AdamW update rule, transcribed line by line for one scalar."""
    theta, m, v, v_max = 1.0, 0.0, 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        g = grad
        if decoupled:
            theta = theta * (1 - lr * wd)  # theta <- theta * (1 - lr * weight_decay)
        else:
            g = grad + wd * theta  # g <- grad + weight_decay * theta
        m = b1 * m + (1 - b1) * g  # m <- beta1 * m + (1 - beta1) * g
        v = b2 * v + (1 - b2) * g * g  # v <- beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - b1 ** t)  # m_hat = m / (1 - beta1^t)
        if amsgrad:
            v_max = max(v_max, v)  # v_max <- max(v_max, v)
            v_hat = v_max / (1 - b2 ** t)  # v_hat = v_max / (1 - beta2^t)   if amsgrad
        else:
            v_hat = v / (1 - b2 ** t)  # v / (1 - beta2^t)   otherwise
        theta = theta - lr * m_hat / (v_hat ** 0.5 + eps)
    return theta


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_amsgrad_rule_in_explain_is_what_the_optimizer_computes(name, capsys):
    """The documented AMSGrad is torch's: the max of the uncorrected v, bias-corrected after
    (pytorch/pytorch#142323). Checked on the text, then numerically: a scalar transcription of
    the text reproduces optimkit's trajectory, and the wrong reading (max of v_hat) does not."""
    spec = get_spec(name)
    rule = spec.update_rule
    assert "v_max <- max(v_max, v) " in rule and "v_hat = v_max / (1 - beta2^t)   if amsgrad" in rule
    assert "max(v_max, v_hat)" not in rule
    doc = spec.hyperparam("amsgrad").doc
    assert "v_max = max(v_max, v)" in doc and "v_hat = v_max / (1 - beta2^t)" in doc
    main(["explain", name])
    out = capsys.readouterr().out
    assert "v_max <- max(v_max, v) " in out and "max(v_max, v_hat)" not in out

    # large first gradient, then small ones: v_hat = v / (1 - b2^t) shrinks while v first
    # grows then decays, so the two readings of "max" give different denominators
    grads = [1.0, 0.1, -0.3, 0.1, 0.05, 2.0, 0.1, -0.1]
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.05
    decoupled = name == "adamw"
    for amsgrad in (True, False):
        p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = spec.cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad)
        for g in grads:
            p.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
        documented = _adam_rule_as_documented(grads, lr, b1, b2, eps, wd, decoupled, amsgrad)
        assert p.item() == pytest.approx(documented, rel=1e-12, abs=1e-14), amsgrad

    # the check can fail: the max of the bias-corrected v_hat moves the parameter elsewhere
    theta, m, v, vmax = 1.0, 0.0, 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        g = grad if decoupled else grad + wd * theta
        theta = theta * (1 - lr * wd) if decoupled else theta
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        vmax = max(vmax, v / (1 - b2 ** t))
        theta -= lr * (m / (1 - b1 ** t)) / (vmax ** 0.5 + eps)
    assert abs(theta - _adam_rule_as_documented(grads, lr, b1, b2, eps, wd, decoupled, True)) > 1e-3


# ------------------------------------------------------------ zero-tuning presets (measured)
def _evidence():
    import json
    from pathlib import Path

    from optimkit.guide.presets import EVIDENCE

    return json.loads((Path(__file__).resolve().parents[1] / EVIDENCE).read_text())


def test_no_tuning_table_is_what_its_evidence_says():
    """Every row names a candidate, builds, cites existing tasks, copies the measured gaps from
    the evidence file, and is the candidate with the smallest worst gap there (the choice rule
    of benchmarks/presets.py --choose)."""
    from optimkit.guide.presets import CANDIDATES, NO_TUNING

    data = _evidence()
    assert "any" in NO_TUNING
    for kind, row in NO_TUNING.items():
        assert row.preset in CANDIDATES, kind
        create_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(3))], optimizer_args=dict(row.args))
        assert set(row.gaps) == set(row.tasks)
        for task, gap in row.gaps.items():
            assert task in BUILTIN_TASKS
            assert data["tasks"][task]["presets"][row.preset]["gap"] == pytest.approx(gap, abs=1e-4), (kind, task)
        if row.gaps:
            measured = [n for n in CANDIDATES if all(n in data["tasks"][t]["presets"] for t in row.gaps)]
            worst = {n: max(data["tasks"][t]["presets"][n]["gap"] for t in row.gaps) for n in measured}
            assert worst[row.preset] == min(worst.values()), (kind, worst)


@pytest.mark.parametrize("traits", [
    Traits(no_tuning=True), Traits(no_tuning=True, model="transformer"), Traits(no_tuning=True, model="linear"),
    Traits(no_tuning=True, model="cnn"), Traits(no_tuning=True, model="mlp"), Traits(no_tuning=True, model="rnn"),
    Traits(no_tuning=True, sparse=True), Traits(no_tuning=True, fine_tune=True, model="transformer"),
    Traits(no_tuning=True, memory_tight=True),
])
def test_no_tuning_recommends_the_measured_preset(traits):
    from optimkit.guide.presets import DECIDED, no_tuning_preset

    key, row = no_tuning_preset(traits.model, traits.sparse, traits.fine_tune)
    rec = next(r for r in recommend(traits, top=10) if r.optimizer == "prodigy")
    assert {k: v for k, v in rec.hyperparams.items() if k in DECIDED} == row.args
    assert rec.measured and repr(row.preset) in rec.measured and f"for {key}" in rec.measured
    assert set(row.tasks) <= set(rec.evidence)
    if traits.memory_tight:  # advice outside the preset stays
        assert rec.hyperparams["slice_p"] == 11
    if traits.model == "rnn":  # no rnn task: the preset of every task, said so
        assert key == "any"


def test_no_tuning_cli_and_explain_show_the_table(capsys):
    assert main(["recommend", "--no-tuning", "--model", "transformer", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "measured: zero-tuning preset" in out and "docs/presets-" in out
    assert main(["explain", "prodigy"]) == 0
    out = capsys.readouterr().out
    assert "Zero-tuning presets" in out and "gap = (L_preset - L_best) / (L_init - L_best)" in out


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_explain_fits_the_terminal_and_loses_no_word(name):
    """``optimkit explain`` at 80 and 100 columns: no line wider than the terminal, and the
    same words (bar the ``;`` between two statements of a rule line and the ``|`` between the
    two "Try it" commands, which become line breaks) as a wide rendering, in order."""
    spec = get_spec(name)
    wide = [w for w in render_text(spec, width=400).split() if w not in (";", "|")]
    for width in (80, 100):
        text = render_text(spec, width=width)
        long = [line for line in text.splitlines() if len(line) > width]
        assert not long, (width, long)
        assert [w for w in text.split() if w not in (";", "|")] == wide


def test_explain_follows_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["explain", "adamw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80
    assert any("(decoupled, AdamW / decoupled_weight_decay=True)" in line for line in lines)


def test_recommend_text_fits_80_columns_and_flags_dense_only_optimizers():
    """Prose wrapped at 80 columns (a command to copy may run longer, never broken); with
    --sparse, every recommended optimizer that cannot take sparse gradients says so."""
    traits = Traits(sparse=True)
    recs = recommend(traits, top=5)
    text = render_recommendations(traits, recs, width=80)
    for line in text.splitlines():
        assert len(line) <= 80 or line.strip().startswith("optimkit compare --optimizers"), line
    for r in recs:
        cls = get_spec(r.optimizer).cls
        dense_only = [s for s in r.setup if "takes dense gradients only" in s]
        assert bool(dense_only) == (not cls._supports_sparse), (r.optimizer, r.setup)


def test_no_tuning_ties_go_to_the_optimizer_without_an_lr_search():
    recs = recommend(Traits(model="transformer", fine_tune=True, no_tuning=True), top=3)
    scores = {r.optimizer: r.score for r in recs}
    if scores.get("prodigy") == scores.get("adamw"):
        assert [r.optimizer for r in recs].index("prodigy") < [r.optimizer for r in recs].index("adamw")
    assert recs[0].optimizer == "prodigy"
