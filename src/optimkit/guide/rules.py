"""The recommendation rules, as data.

Each :class:`Rule` says: when the task has these traits, this registry optimizer gains (or
loses) ``score`` points, starting from these constructor arguments, for this reason. A rule
backed by an ``optimkit compare`` run names the built-in task (``evidence``); run
``optimkit compare --tasks <task>`` to see the numbers on your machine. Evidence is cited only
where the default suite (registry default lrs, 2 seeds, 300 steps) showed it; the rest is the
established practice the reason states.

``CORRECTIONS`` holds the facts that popular guides get wrong; ``optimkit recommend`` prints
the ones about the optimizers it recommends and ``optimkit explain`` prints them too.

Scores are additive and only their order matters. Constructor arguments (``hyperparams``) must
be documented hyperparameters of the registry entry (a test checks this); training-recipe
advice that is not a constructor argument (schedules, warm-up, clipping) goes in ``setup``.
When several matching rules give the same argument, the more specific rule (more conditions)
wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Rule", "RULES", "CORRECTIONS", "TRAITS"]

#: trait name -> allowed values (the CLI's flags)
TRAITS: dict[str, tuple[Any, ...]] = {
    "model": ("cnn", "transformer", "rnn", "gan", "linear", "mlp"),
    "sparse": (True, False),
    "data_size": ("small", "medium", "large"),
    "memory_tight": (True, False),
    "no_tuning": (True, False),
    "fine_tune": (True, False),
}


@dataclass(frozen=True)
class Rule:
    """One piece of advice: ``when`` all traits match, ``optimizer`` gains ``score``."""

    when: dict[str, Any]  # {} = always
    optimizer: str  # registry name
    score: float
    reason: str
    hyperparams: dict[str, Any] = field(default_factory=dict)
    setup: str = ""  # recipe advice outside the constructor (schedule, warm-up, clipping)
    evidence: tuple[str, ...] = ()  # built-in compare tasks backing the rule


RULES: tuple[Rule, ...] = (
    # ------------------------------------------------------------------ baseline (always)
    Rule({}, "adamw", 3, "Robust default across architectures; decoupled weight decay regularises "
         "every weight the same way regardless of its gradient scale.",
         {"lr": 1e-3, "weight_decay": 0.01}),
    Rule({}, "prodigy", 2.5, "Estimates its own step size (d) from the distance travelled, so one run "
         "replaces an lr search; best mean rank over the default compare suite at lr=1.",
         {"lr": 1.0, "d_coef": 1.0}, evidence=("logreg", "cnn", "charlm")),
    Rule({}, "adam", 1.5, "Adam without weight decay: the usual baseline; lr 1e-3 works out of the box "
         "on many problems.", {"lr": 1e-3}),
    Rule({}, "nesterov", 1, "Tuned SGD with Nesterov momentum is still the most reliable optimizer for "
         "generalisation when you can afford an lr search and a schedule.", {"lr": 0.05}),
    # ------------------------------------------------------------------ model kind
    Rule({"model": "cnn"}, "nesterov", 4, "CNNs with batch norm: SGD + Nesterov momentum with a cosine "
         "schedule is the standard ImageNet/CIFAR recipe and tends to generalise better than Adam.",
         {"lr": 0.1, "weight_decay": 5e-4}, setup="lr 0.1 per 256 images (linear scaling), cosine decay "
         "to 0, 5 epochs of linear warm-up for large batches.", evidence=("cnn",)),
    Rule({"model": "cnn"}, "momentum", 3, "Heavy-ball momentum 0.9: the same recipe as Nesterov, "
         "marginally more overshoot.", {"lr": 0.1, "weight_decay": 5e-4}),
    Rule({"model": "cnn"}, "adamw", 1, "Faster to get working than SGD on a small CNN at its default "
         "lr; use a larger decay than for transformers.", {"lr": 1e-3, "weight_decay": 0.05},
         evidence=("cnn",)),
    Rule({"model": "cnn"}, "prodigy", 1, "On the small CNN Prodigy at lr=1 ties the best accuracy and "
         "reaches the target in the fewest steps, without an lr search.", {"lr": 1.0, "weight_decay": 5e-4},
         evidence=("cnn",)),
    Rule({"model": "transformer"}, "adamw", 4, "Transformers train best with AdamW: their blocks "
         "have very different gradient scales, which per-coordinate normalisation absorbs.",
         {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1},
         setup="linear warm-up over 1-5% of steps, then cosine decay to ~10% of the peak; clip the "
         "gradient norm at 1.0; no decay on biases and norm weights (optimkit.param_groups)."),
    Rule({"model": "transformer"}, "radam", 1.5, "Rectified Adam removes the need to tune a warm-up, "
         "which transformers otherwise require at higher lrs.", {"lr": 3e-4, "betas": (0.9, 0.95)}),
    Rule({"model": "transformer"}, "prodigy", 1.5, "Works for transformers at lr=1: with betas=(0.9, 0.99) "
         "and d_coef=2 it came within 0.4% of the best AdamW of an lr grid on both char-level "
         "transformer tasks (docs/choosing.md).",
         {"lr": 1.0, "betas": (0.9, 0.99), "d_coef": 2.0}, setup="under a warm-up schedule set "
         "safeguard_warmup=True so the warm-up does not inflate d (without one it only slows d's growth).",
         evidence=("charlm", "fortunes")),
    Rule({"model": "transformer"}, "sgd", -4, "Plain SGD trains transformers poorly: one lr cannot "
         "suit embeddings, attention and MLP blocks at once.", evidence=("charlm",)),
    Rule({"model": "transformer"}, "nesterov", -2, "SGD with momentum needs a tuned lr and warm-up on "
         "transformers; at its default lr it trails five adaptive methods on charlm.",
         evidence=("charlm",)),
    Rule({"model": "rnn"}, "adam", 3, "RNNs/LSTMs: Adam with gradient-norm clipping is the dependable "
         "choice.", {"lr": 1e-3}, setup="clip the gradient norm (0.25..1.0); truncated BPTT."),
    Rule({"model": "rnn"}, "rmsprop", 2.5, "RMSprop was designed for (and long used on) recurrent nets "
         "and non-stationary objectives such as RL.", {"lr": 1e-3, "alpha": 0.99},
         setup="clip the gradient norm."),
    Rule({"model": "rnn"}, "sgd", -2, "Exploding/vanishing gradients make a single global lr fragile "
         "for RNNs."),
    Rule({"model": "gan"}, "adam", 4, "GANs: Adam with beta1 = 0.5 (DCGAN) damps the oscillation of "
         "the two-player game; often a lower lr for the generator than the discriminator.",
         {"lr": 2e-4, "betas": (0.5, 0.999)}, setup="one optimizer per network; TTUR: discriminator "
         "lr ~2-4x the generator's."),
    Rule({"model": "gan"}, "rmsprop", 1.5, "RMSprop without momentum is the WGAN (weight clipping) "
         "recipe: momentum destabilises that critic.", {"lr": 5e-5}),
    Rule({"model": "gan"}, "prodigy", -1, "Prodigy's step-size estimate assumes one objective moving "
         "towards one solution; a min-max game breaks that assumption (untested by compare)."),
    Rule({"model": "gan"}, "adamw", -1, "Weight decay is rarely used on GANs; plain Adam is the "
         "reference recipe."),
    Rule({"model": "linear"}, "adagrad", 1, "Convex problems: Adagrad's per-coordinate steps come with "
         "regret guarantees and need no schedule (give it lr ~0.1: at 0.01 it is slow on logreg).",
         {"lr": 0.1}),
    Rule({"model": "linear"}, "momentum", 2, "Well-conditioned convex problem: SGD with momentum 0.9 "
         "was the fastest to the target and the most accurate on logreg.", {"lr": 0.05},
         evidence=("logreg",)),
    Rule({"model": "linear"}, "prodigy", 2, "On the convex logistic regression Prodigy at lr=1 is among "
         "the fastest to the target without tuning.", {"lr": 1.0}, evidence=("logreg",)),
    Rule({"model": "linear"}, "sgd", 1.5, "Convex and well-conditioned: plain SGD at a decent lr "
         "converges, with no state memory.", {"lr": 0.1}, evidence=("logreg",)),
    Rule({"model": "mlp"}, "adam", 2, "Small MLPs: Adam at its default lr is the quickest to a good "
         "result.", {"lr": 1e-3}),
    Rule({"model": "mlp"}, "adamw", 1, "Add decoupled decay when the MLP overfits.",
         {"lr": 1e-3, "weight_decay": 0.01}),
    # ------------------------------------------------------------------ data traits
    Rule({"sparse": True}, "adagrad", 5, "Sparse features: Adagrad gives rarely seen features (rare "
         "words, users, items) large steps and frequent ones small steps; with SGD, the optimkit "
         "optimizer that takes sparse gradients (nn.Embedding(sparse=True)).", {"lr": 0.05},
         evidence=("docbow",)),
    Rule({"sparse": True}, "rmsprop", 3.5, "Per-coordinate normalisation like Adagrad, but forgets, so "
         "it keeps moving in long runs; the most accurate on the bag-of-words task.", {"lr": 1e-3},
         evidence=("docbow",)),
    Rule({"sparse": True}, "sgd", -2, "One global lr under-trains rare features: their gradients are "
         "zero most steps (last on the bag-of-words task).", evidence=("docbow",)),
    Rule({"sparse": True}, "momentum", -1, "Momentum keeps moving rows that had no gradient this step "
         "and still under-trains rare features (behind every per-coordinate method on docbow).",
         evidence=("docbow",)),
    Rule({"data_size": "small"}, "nesterov", 1, "Small data: tuned SGD with momentum tends to "
         "generalise better; use stronger weight decay.", {"weight_decay": 5e-4}),
    Rule({"data_size": "small"}, "adamw", 0.5, "Small data: raise weight decay (0.05-0.1) against "
         "overfitting.", {"weight_decay": 0.05}),
    Rule({"data_size": "large"}, "adamw", 1, "Large data: AdamW scales to long runs with a warm-up + "
         "cosine schedule; tune lr once on a shorter run.", {}),
    # ------------------------------------------------------------------ constraints
    Rule({"memory_tight": True}, "sgd", 3, "No optimizer state at all (0 bytes/param).", {}),
    Rule({"memory_tight": True}, "momentum", 2.5, "One state buffer (4 bytes/param in fp32): half of "
         "Adam's.", {}),
    Rule({"memory_tight": True}, "adagrad", 1.5, "One state buffer (4 bytes/param).", {}),
    Rule({"memory_tight": True}, "rmsprop", 1.5, "One state buffer (4 bytes/param) when not centered "
         "and without momentum.", {}),
    Rule({"memory_tight": True}, "adamw", -1, "Two state buffers (8 bytes/param in fp32).", {}),
    Rule({"memory_tight": True}, "adam", -1, "Two state buffers (8 bytes/param in fp32).", {}),
    Rule({"memory_tight": True}, "prodigy", -3, "Four state buffers (16 bytes/param): the most "
         "memory-hungry here; slice_p=11 shrinks two of them ~11x.", {"slice_p": 11}),
    Rule({"no_tuning": True}, "prodigy", 5, "No lr to tune: keep lr=1.0; if it is too aggressive or "
         "too timid change d_coef (larger d_coef = larger steps).", {"lr": 1.0, "d_coef": 1.0},
         evidence=("logreg", "cnn", "charlm")),
    Rule({"no_tuning": True}, "adadelta", 1, "Adapts its step size per coordinate; keep its lr at 1.0 "
         "(it still has one). Slow start, usually behind Prodigy.", {"lr": 1.0}),
    Rule({"no_tuning": True}, "adam", 1, "lr=1e-3 is a reasonable untuned default for Adam.",
         {"lr": 1e-3}),
    Rule({"no_tuning": True}, "sgd", -3, "No lr fits all problems: untuned SGD diverges or crawls."),
    Rule({"no_tuning": True}, "nesterov", -2, "Needs an lr search and a schedule to shine."),
    Rule({"no_tuning": True}, "momentum", -2, "Needs an lr search and a schedule to shine."),
    Rule({"fine_tune": True}, "adamw", 2, "Fine-tuning: AdamW at a 10-100x lower lr than pre-training "
         "keeps the pretrained features.", {"lr": 1e-4, "weight_decay": 0.01},
         setup="short warm-up; lr 1e-5..1e-4 (full fine-tune), 1e-4..1e-3 (LoRA/adapters)."),
    Rule({"fine_tune": True}, "prodigy", 2, "Popular for LoRA/diffusion fine-tuning at lr=1. On the "
         "fine-tuning task its defaults beat the best AdamW of an lr grid, while bias correction with "
         "the warm-up safeguard left 7% of the progress undone (docs/choosing.md); lower d_coef (0.5) "
         "if the pretrained model drifts.", {"lr": 1.0},
         setup="different lrs per param group (text encoder / U-Net, LoRA+): split_groups=True; "
         "safeguard_warmup=True only under a warm-up schedule.", evidence=("fortunes_ft",)),
    Rule({"fine_tune": True, "model": "transformer"}, "adamw", 2, "Transformer fine-tuning (BERT/LLM "
         "style): lr 1e-5..5e-5 with linear decay.", {"lr": 2e-5, "betas": (0.9, 0.999),
                                                      "weight_decay": 0.01}),
    Rule({"fine_tune": True, "model": "cnn"}, "momentum", 2, "CNN fine-tuning: SGD momentum at "
         "lr 0.01 (10x below training from scratch), lower still for the backbone.",
         {"lr": 0.01, "weight_decay": 1e-4}),
    Rule({"fine_tune": True}, "adagrad", -1, "Adagrad's ever-shrinking steps suit training from "
         "scratch on convex/sparse problems, not adapting a pretrained net."),
)


#: facts that popular guides get wrong, by registry name
CORRECTIONS: dict[str, str] = {
    "prodigy": (
        "Keep lr=1.0: Prodigy's lr multiplies its own step-size estimate d, so lr=1e-4 copied from "
        "an Adam recipe makes it ~10^4x too slow. To change how aggressive it is, tune d_coef: a "
        "LARGER d_coef gives a larger d (more aggressive), a smaller one (0.5, 0.1) a more careful "
        "run. Use lr only for schedules (cosine), with safeguard_warmup=True under a warm-up."
    ),
    "adamw": (
        "AdamW is not Adam with weight_decay: Adam's weight_decay is an L2 term added to the "
        "gradient and then divided by sqrt(v), so weights with large gradients are barely "
        "regularised; AdamW decays every weight by lr*weight_decay per step (decoupled). Values "
        "are not interchangeable: AdamW typically uses 0.01-0.1. "
        "AMSGrad (amsgrad=True) takes the running max of the UNcorrected v and bias-corrects "
        "afterwards (v_max = max(v_max, v); v_hat = v_max / (1 - beta2^t)), as torch.optim does; "
        "texts that take the max of the corrected v_hat describe a different optimizer."
    ),
    "adam": (
        "Adam's weight_decay is coupled L2 (added to the gradient, then normalised), not the "
        "decoupled decay of AdamW; for weight decay use adamw (or decoupled_weight_decay=True). "
        "AMSGrad (amsgrad=True) takes the running max of the UNcorrected v and bias-corrects "
        "afterwards (v_max = max(v_max, v); v_hat = v_max / (1 - beta2^t)), as torch.optim does; "
        "texts that take the max of the corrected v_hat describe a different optimizer."
    ),
    "adadelta": (
        "Adadelta is often described as having 'no learning rate'; it has one (lr, default 1.0) "
        "that multiplies its step. Keep 1.0 unless you need to damp it; its first steps are "
        "~sqrt(eps) in size, so raise eps rather than lr to start faster."
    ),
}
