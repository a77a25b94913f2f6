"""The optimizer registry: the single source of truth for every optimizer optimkit names.

Every consumer reads this table: ``create_optimizer`` builds from it, ``list_optimizers``
lists it, ``optimkit explain`` / ``recommend`` / the docs render it, and the tests iterate
over it. One frozen :class:`OptimizerSpec` per name, written out explicitly (no magic
registration decorators), so ``git grep`` finds everything optimkit claims about an optimizer.

``HyperParam.default`` is the *effective* default of that registry entry: the class
signature's default, overridden by the entry's ``preset`` (``momentum`` is SGD with
``momentum=0.9``). ``tests/test_registry.py`` checks every default against the class.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass, replace, field
from typing import Any

from ..optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, Prodigy, RAdam, RMSprop


@dataclass(frozen=True)
class HyperParam:
    """One constructor argument, documented."""

    name: str
    default: Any
    valid: str  # human-readable valid range, e.g. "0 <= x < 1"
    doc: str  # one sentence: what it really does (units, direction of effect)


@dataclass(frozen=True)
class SearchDim:
    """One tuned hyperparameter of ``optimkit compare --budget``: log-uniform in [low, high]."""

    name: str
    low: float
    high: float
    log: bool = True

    def around(self, center: float) -> "SearchDim":
        """The same relative range around ``center`` (the user's own value in a spec)."""
        mid = math.sqrt(self.low * self.high)
        return SearchDim(self.name, self.low * center / mid, self.high * center / mid, self.log)


#: how far ``--budget`` searches the lr of the classics: default / 30 .. default x 30 (three
#: decades; the best of a 5-point x0.1..x10 grid sat on its edge for 6 of 8 optimizers, so
#: the range is wider, and compare extends it past an edge once)
LR_SEARCH_FACTOR = 30.0


def _lr_space(default_lr: float) -> tuple[SearchDim, ...]:
    return (SearchDim("lr", default_lr / LR_SEARCH_FACTOR, default_lr * LR_SEARCH_FACTOR),)


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything optimkit knows about one optimizer."""

    name: str  # canonical registry name, lower case: "adamw"
    cls: type  # the class constructed
    description: str  # one line
    hyperparams: tuple[HyperParam, ...]
    when_to_use: str
    update_rule: str  # the math, plain text, several lines
    tuning: str = ""  # tuning advice
    pitfalls: str = ""
    aliases: tuple[str, ...] = ()
    # kwargs applied on top of the class defaults (e.g. "momentum" = SGD with momentum=0.9)
    preset: dict[str, Any] = field(default_factory=dict)
    # learning rate used when the user gives none (compare's "recommended default")
    default_lr: float | None = None
    needs_lr_tuning: bool = True  # False for Prodigy / Adadelta
    state_buffers: int = 0  # full-size state tensors per parameter (memory cost)
    # what ``optimkit compare --budget`` searches: each dimension log-uniform in [low, high]
    search_space: tuple["SearchDim", ...] = ()

    def hyperparam(self, name: str) -> HyperParam:
        """The documented hyperparameter ``name`` (``KeyError`` if this optimizer has none)."""
        for hp in self.hyperparams:
            if hp.name == name:
                return hp
        raise KeyError(f"{self.name} has no hyperparameter {name!r}")


# ------------------------------------------------------------------------------ shared rows
# Arguments several optimizers share, documented once.
def _maximize() -> HyperParam:
    return HyperParam("maximize", False, "True or False",
                      "Ascend the objective instead of descending it (the gradient's sign is flipped).")


def _foreach() -> HyperParam:
    return HyperParam("foreach", None, "True, False or None",
                      "Implementation choice only, never the math: True multi-tensor kernels, "
                      "False the per-tensor reference, None the fastest available.")


def _fused() -> HyperParam:
    return HyperParam("fused", None, "True, False or None",
                      "Implementation choice only: True uses torch's single-pass fused kernel "
                      "(CPU/CUDA, floating dtypes); cannot be combined with foreach=True.")


def _weight_decay(default: float, *, decoupled: bool) -> HyperParam:
    if decoupled:
        doc = ("Decoupled decay rate per unit of lr: each step multiplies the weights by "
               "(1 - lr * weight_decay) before the gradient step; larger shrinks weights faster.")
    else:
        doc = ("Coupled L2 penalty: weight_decay * theta is added to the gradient (so it is "
               "rescaled by the adaptive denominator, if any); larger pulls weights to 0 harder.")
    return HyperParam("weight_decay", default, "0 <= weight_decay < inf", doc)


def _betas() -> HyperParam:
    return HyperParam("betas", (0.9, 0.999), "0 <= beta1 < 1, 0 <= beta2 < 1",
                      "EMA decay rates of the gradient (beta1, memory ~1/(1-beta1) steps) and of "
                      "the squared gradient (beta2, ~1/(1-beta2) steps); larger = smoother, slower "
                      "to react.")


#: the classic optimizers' eps range (optimkit._validation.check_eps: float32's tiny)
_EPS_VALID = "1.1754943508222875e-38 <= eps < inf"


def _eps(default: float, where: str = "added to sqrt(v) in the denominator",
         valid: str = _EPS_VALID) -> HyperParam:
    return HyperParam("eps", default, valid,
                      f"Numerical floor {where}, in gradient units; larger damps steps of "
                      "parameters whose gradients are tiny (behaves more like SGD).")


def _lr(default: float, doc: str) -> HyperParam:
    return HyperParam("lr", default, "0 <= lr < inf", doc)


_SGD_HP = (
    _lr(1e-3, "Step size: parameter change per unit of (momentum-averaged) gradient; larger "
              "moves faster and diverges past ~2/curvature."),
    HyperParam("momentum", 0, "0 <= momentum < 1",
               "Heavy-ball coefficient: fraction of the previous update kept; the effective step "
               "grows to ~lr/(1-momentum) along consistent directions."),
    HyperParam("dampening", 0, "0 <= dampening <= 1",
               "Fraction of the new gradient kept out of the momentum buffer; larger shrinks the "
               "effective step (must be 0 with nesterov)."),
    _weight_decay(0, decoupled=False),
    HyperParam("nesterov", False, "True or False (needs momentum > 0, dampening = 0)",
               "Evaluate the momentum step at the look-ahead point (g + momentum*b), which "
               "reduces overshoot on curved valleys."),
    _maximize(), _foreach(), _fused(),
)


def _sgd_preset(momentum: float, nesterov: bool) -> tuple[HyperParam, ...]:
    out = []
    for hp in _SGD_HP:
        if hp.name == "momentum":
            hp = HyperParam(hp.name, momentum, hp.valid, hp.doc)
        elif hp.name == "nesterov":
            hp = HyperParam(hp.name, nesterov, hp.valid, hp.doc)
        out.append(hp)
    return tuple(out)


_SGD_RULE = """\
g <- grad + weight_decay * theta                (coupled L2; -grad if maximize)
b <- g                                          (first step)
b <- momentum * b + (1 - dampening) * g         (later steps; skipped when momentum = 0)
d <- g + momentum * b   if nesterov
     b                  if momentum > 0
     g                  otherwise
theta <- theta - lr * d"""

_ADAM_RULE = """\
g <- grad + weight_decay * theta                (coupled L2, Adam only; -grad if maximize)
theta <- theta * (1 - lr * weight_decay)        (decoupled, AdamW / decoupled_weight_decay=True)
m <- beta1 * m + (1 - beta1) * g
v <- beta2 * v + (1 - beta2) * g^2
m_hat = m / (1 - beta1^t)
v_max <- max(v_max, v)                          (amsgrad only: max of the UNcorrected v)
v_hat = v_max / (1 - beta2^t)   if amsgrad
        v / (1 - beta2^t)       otherwise
theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)"""

_ADAM_HP_TAIL = (
    _eps(1e-8),
    HyperParam("amsgrad", False, "True or False",
               "Divide by the running maximum of the uncorrected second moment, as torch.optim "
               "computes it: v_max = max(v_max, v), then v_hat = v_max / (1 - beta2^t). The "
               "uncorrected denominator never shrinks; costs one more state buffer."),
    _maximize(), _foreach(), _fused(),
)


def _state_dtype(what: str) -> HyperParam:
    return HyperParam("state_dtype", None, "None, float32 or bfloat16 (float16 is refused)",
                      f"Dtype of {what}: None keeps the default; bfloat16 halves those buffers for "
                      "float32 parameters, computing in float32 and writing back with unbiased "
                      "stochastic rounding (see docs/performance.md for its measured effect).")


_ADAM_TUNING = ("Tune lr first (log grid 1e-4..3e-3); beta2=0.99 or 0.95 reacts faster and is "
                "more stable for transformers / noisy losses; leave eps unless using fp16.")

# ------------------------------------------------------------------------------ the table
_SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="sgd",
        cls=SGD,
        description="Plain stochastic gradient descent: step against the gradient, no memory.",
        hyperparams=_SGD_HP,
        when_to_use=("Convex or well-conditioned problems, as a baseline, or when memory matters "
                     "most (no state). For deep nets prefer momentum/nesterov."),
        update_rule=_SGD_RULE,
        tuning=("lr is everything: search a log grid (0.01..1 for normalised nets); decay it "
                "(cosine or step) for the last part of training."),
        pitfalls=("No default lr fits all: too large diverges, too small crawls. Slow on "
                  "ill-conditioned problems (progress along flat directions ~lr * curvature)."),
        aliases=(),
        default_lr=0.1,
        search_space=_lr_space(0.1),
        needs_lr_tuning=True,
        state_buffers=0,
    ),
    OptimizerSpec(
        name="momentum",
        cls=SGD,
        description="SGD with heavy-ball momentum 0.9: averages gradients over ~10 steps.",
        hyperparams=_sgd_preset(0.9, False),
        when_to_use=("The classic for CNNs / vision with a schedule; often generalises better "
                     "than adaptive methods when lr and schedule are tuned."),
        update_rule=_SGD_RULE,
        tuning=("Tune lr (0.01..0.5 for normalised nets) with momentum fixed at 0.9; the "
                "effective step is lr/(1-momentum) = 10*lr, so use ~1/10 the plain-SGD lr."),
        pitfalls=("Raising momentum without lowering lr raises the effective step; oscillates if "
                  "lr/(1-momentum) exceeds ~2/curvature. Needs warm-up for very deep nets."),
        aliases=("sgdm", "sgd_momentum"),
        preset={"momentum": 0.9},
        default_lr=0.05,
        search_space=_lr_space(0.05),
        needs_lr_tuning=True,
        state_buffers=1,
    ),
    OptimizerSpec(
        name="nesterov",
        cls=SGD,
        description="SGD with Nesterov momentum 0.9: momentum with a look-ahead correction.",
        hyperparams=_sgd_preset(0.9, True),
        when_to_use=("Same use cases as momentum; slightly less overshoot, the usual default for "
                     "ResNet-style training recipes."),
        update_rule=_SGD_RULE,
        tuning="As momentum: tune lr with momentum 0.9; cosine or step decay.",
        pitfalls="Requires momentum > 0 and dampening = 0 (raises otherwise).",
        aliases=("sgdnesterov", "nag"),
        preset={"momentum": 0.9, "nesterov": True},
        default_lr=0.05,
        search_space=_lr_space(0.05),
        needs_lr_tuning=True,
        state_buffers=1,
    ),
    OptimizerSpec(
        name="adagrad",
        cls=Adagrad,
        description="Per-coordinate steps lr/sqrt(sum of all past squared gradients).",
        hyperparams=(
            _lr(1e-2, "Base step size in parameter units (the per-coordinate step is "
                      "lr/sqrt(accumulated g^2)); larger moves faster."),
            HyperParam("lr_decay", 0, "0 <= lr_decay < inf",
                       "Per-step decay: step t uses lr / (1 + (t-1)*lr_decay); larger decays faster."),
            _weight_decay(0, decoupled=False),
            HyperParam("initial_accumulator_value", 0, "0 <= initial_accumulator_value < inf",
                       "Starting value of the sum of squared gradients (gradient^2 units); larger "
                       "makes the first steps smaller."),
            _eps(1e-10, "added to sqrt(sum)"),
            _foreach(), _maximize(), _fused(),
        ),
        when_to_use=("Sparse features (embeddings, NLP bag-of-words, recommender systems) and "
                     "convex problems; the only optimkit optimizer taking sparse gradients."),
        update_rule="""\
g <- grad + weight_decay * theta                (-grad if maximize)
clr = lr / (1 + (t - 1) * lr_decay)
sum <- sum + g^2
theta <- theta - clr * g / (sqrt(sum) + eps)""",
        tuning="lr 1e-2..1e-1; the accumulator shrinks steps automatically, so no schedule needed.",
        pitfalls=("The accumulator never forgets, so steps shrink towards 0 in long non-convex "
                  "training; use RMSprop/Adam there."),
        aliases=(),
        default_lr=1e-2,
        search_space=_lr_space(1e-2),
        needs_lr_tuning=True,
        state_buffers=1,
    ),
    OptimizerSpec(
        name="rmsprop",
        cls=RMSprop,
        description="Per-coordinate steps lr/sqrt(EMA of squared gradients).",
        hyperparams=(
            _lr(1e-2, "Step size in parameter units per normalised gradient; larger moves faster."),
            HyperParam("alpha", 0.99, "0 <= alpha < 1 (0 < alpha with centered=True)",
                       "EMA decay of the squared gradient (memory ~1/(1-alpha) steps); larger is "
                       "smoother but slower to react to scale changes."),
            _eps(1e-8),
            _weight_decay(0, decoupled=False),
            HyperParam("momentum", 0, "0 <= momentum < 1",
                       "Heavy-ball momentum on the normalised step; raises the effective step to "
                       "~lr/(1-momentum)."),
            HyperParam("centered", False, "True or False",
                       "Normalise by the gradient variance (v - mean(g)^2) instead of v; larger "
                       "steps when gradients are consistent, one more buffer."),
            _foreach(), _maximize(), _fused(),
        ),
        when_to_use=("Recurrent nets and reinforcement learning (non-stationary objectives); a "
                     "lighter alternative to Adam without bias correction."),
        update_rule="""\
g <- grad + weight_decay * theta                (-grad if maximize)
v <- alpha * v + (1 - alpha) * g^2
gbar <- alpha * gbar + (1 - alpha) * g          (centered only)
denom = sqrt(max(v - gbar^2, 0)) + eps   if centered else   sqrt(v) + eps
b <- momentum * b + g / denom ;  theta <- theta - lr * b     if momentum > 0
theta <- theta - lr * g / denom                               otherwise""",
        tuning="lr 1e-4..1e-2 (1e-3 a good start); keep alpha 0.99; momentum 0.9 helps sometimes.",
        pitfalls=("No bias correction: v starts at 0, so the first steps are up to "
                  "1/sqrt(1-alpha) = 10x larger than later ones; torch's default lr 1e-2 is "
                  "often too high, hence optimkit's default_lr 1e-3."),
        aliases=(),
        default_lr=1e-3,
        search_space=_lr_space(1e-3),
        needs_lr_tuning=True,
        state_buffers=1,
    ),
    OptimizerSpec(
        name="adam",
        cls=Adam,
        description="Adaptive moment estimation: momentum / sqrt(EMA of squared gradients), bias-corrected.",
        hyperparams=(
            _lr(1e-3, "Maximum per-coordinate step, roughly, in parameter units (the normalised "
                      "step m_hat/sqrt(v_hat) is ~1 in magnitude); larger moves faster."),
            _betas(),
            *_ADAM_HP_TAIL[:1],
            _weight_decay(0, decoupled=False),
            *_ADAM_HP_TAIL[1:],
            HyperParam("decoupled_weight_decay", False, "True or False",
                       "Apply weight_decay as AdamW does (theta *= 1 - lr*weight_decay) instead of "
                       "as an L2 term in the gradient."),
            _state_dtype("the moments exp_avg, exp_avg_sq (and max_exp_avg_sq); None is the "
                         "parameter's dtype"),
        ),
        when_to_use=("The robust default for most deep learning when little tuning time is "
                     "available; prefer AdamW when using weight decay."),
        update_rule=_ADAM_RULE,
        tuning=_ADAM_TUNING,
        pitfalls=("weight_decay here is coupled L2 and is divided by sqrt(v): it regularises "
                  "weakly and unevenly; use AdamW. Can generalise worse than tuned SGD on vision."),
        aliases=(),
        default_lr=1e-3,
        search_space=_lr_space(1e-3),
        needs_lr_tuning=True,
        state_buffers=2,
    ),
    OptimizerSpec(
        name="adamw",
        cls=AdamW,
        description="Adam with decoupled weight decay (Loshchilov & Hutter): the transformer default.",
        hyperparams=(
            _lr(1e-3, "Maximum per-coordinate step, roughly, in parameter units; larger moves "
                      "faster and also strengthens the decay (lr * weight_decay per step)."),
            _betas(),
            _eps(1e-8),
            _weight_decay(1e-2, decoupled=True),
            *_ADAM_HP_TAIL[1:],
            _state_dtype("the moments exp_avg, exp_avg_sq (and max_exp_avg_sq); None is the "
                         "parameter's dtype"),
        ),
        when_to_use=("Transformers, fine-tuning, diffusion models, anything trained with weight "
                     "decay; the safest general default."),
        update_rule=_ADAM_RULE,
        tuning=(_ADAM_TUNING + " weight_decay 0.01..0.1; exclude biases and norm weights "
                "(optimkit.param_groups does)."),
        pitfalls=("The decay per step is lr * weight_decay, so changing lr changes the "
                  "regularisation too. Decaying norm weights and biases usually hurts."),
        aliases=("adam_w",),
        default_lr=1e-3,
        search_space=_lr_space(1e-3),
        needs_lr_tuning=True,
        state_buffers=2,
    ),
    OptimizerSpec(
        name="radam",
        cls=RAdam,
        description="Rectified Adam: Adam with an automatic warm-up while v is still unreliable.",
        hyperparams=(
            _lr(1e-3, "Step size in parameter units, as in Adam; larger moves faster."),
            _betas(),
            _eps(1e-8),
            _weight_decay(0, decoupled=False),
            HyperParam("decoupled_weight_decay", False, "True or False",
                       "Apply weight_decay as AdamW does (theta *= 1 - lr*weight_decay) instead of "
                       "as an L2 term in the gradient."),
            _foreach(), _maximize(), _fused(),
        ),
        when_to_use=("Where Adam needs a learning-rate warm-up to be stable (large lr, "
                     "transformers from scratch) and you do not want to tune the warm-up."),
        update_rule="""\
g <- grad + weight_decay * theta                (coupled; decoupled: theta *= 1 - lr*wd)
m <- beta1 * m + (1 - beta1) * g ;  v <- beta2 * v + (1 - beta2) * g^2
m_hat = m / (1 - beta1^t)
rho_inf = 2 / (1 - beta2) - 1 ;  rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
if rho_t > 5:
    r = sqrt((rho_t - 4)(rho_t - 2) rho_inf
             / ((rho_inf - 4)(rho_inf - 2) rho_t))
    theta <- theta - lr * r * m_hat * sqrt(1 - beta2^t) / (sqrt(v) + eps)
else:
    theta <- theta - lr * m_hat                  (SGD-with-momentum steps during warm-up)""",
        tuning=_ADAM_TUNING,
        pitfalls=("The first ~5 steps (rho_t <= 5) are un-normalised momentum-SGD steps of size "
                  "lr * m_hat: with large gradients they can be large."),
        aliases=(),
        default_lr=1e-3,
        search_space=_lr_space(1e-3),
        needs_lr_tuning=True,
        state_buffers=2,
    ),
    OptimizerSpec(
        name="adadelta",
        cls=Adadelta,
        description="Adadelta: step = RMS(past updates) / RMS(gradients) * g, units-consistent.",
        hyperparams=(
            _lr(1.0, "Multiplier on the units-consistent Adadelta step (1.0 = the paper's "
                     "method); larger moves proportionally faster."),
            HyperParam("rho", 0.9, "0 <= rho <= 1",
                       "EMA decay of both squared gradients and squared updates (memory "
                       "~1/(1-rho) steps); larger is smoother."),
            HyperParam("eps", 1e-6, _EPS_VALID,
                       "Added inside both square roots; sets the size of the very first steps "
                       "(~sqrt(eps)) and how fast steps can grow, so larger starts faster."),
            _weight_decay(0, decoupled=False),
            _foreach(), _maximize(),
        ),
        when_to_use=("When you cannot tune a learning rate at all and want something that adapts "
                     "its own step size; small models and quick experiments."),
        update_rule="""\
g <- grad + weight_decay * theta                (-grad if maximize)
v <- rho * v + (1 - rho) * g^2
delta = sqrt(u + eps) / sqrt(v + eps) * g
u <- rho * u + (1 - rho) * delta^2
theta <- theta - lr * delta""",
        tuning="Leave lr=1.0; if progress is slow early, raise eps (1e-6 -> 1e-4).",
        pitfalls=("Steps start at ~sqrt(eps) per coordinate and grow slowly, so the first "
                  "hundreds of steps can look stalled; usually ends behind tuned Adam."),
        aliases=(),
        default_lr=1.0,
        search_space=_lr_space(1.0),
        needs_lr_tuning=False,
        state_buffers=2,
    ),
    OptimizerSpec(
        name="prodigy",
        cls=Prodigy,
        description="Prodigy: Adam whose step size d is estimated online (learning-rate free).",
        hyperparams=(
            _lr(1.0, "Multiplier on the estimated step size d (the applied step is d*lr); keep "
                     "1.0, lower (0.5) only to damp, and use it for schedules."),
            _betas(),
            HyperParam("beta3", None, "None or 0 <= beta3 < 1",
                       "EMA decay of the d-estimate statistics r and s; None means sqrt(beta2); "
                       "larger remembers the trajectory longer."),
            _eps(1e-8, "added to sqrt(v) (scaled by d) in the denominator", "0 < eps < inf"),
            HyperParam("weight_decay", 0, "weight_decay >= 0",
                       "Weight decay rate; decoupled (theta *= 1 - weight_decay*d*lr) when "
                       "decouple=True, else an L2 term added to the gradient; larger shrinks "
                       "weights faster."),
            HyperParam("decouple", True, "True or False",
                       "Use AdamW-style decoupled weight decay (True) or a coupled L2 penalty."),
            HyperParam("use_bias_correction", False, "True or False",
                       "Multiply the step by Adam's bias correction sqrt(1-beta2^t)/(1-beta1^t); "
                       "gives smaller early steps (a built-in warm-up)."),
            HyperParam("safeguard_warmup", False, "True or False",
                       "Leave lr out of the s accumulator so an lr warm-up schedule does not "
                       "inflate d; turn on when using warm-up."),
            HyperParam("d0", 1e-6, "d0 > 0",
                       "Initial step-size estimate in parameter units; only matters if far too "
                       "large (d only grows from it), rarely changed."),
            HyperParam("d_coef", 1.0, "d_coef > 0",
                       "Multiplies the estimate d_hat = d_coef * r / ||s||_1: larger makes d "
                       "(and every step) larger, more aggressive; 0.5..2 typical. The preferred knob."),
            HyperParam("growth_rate", math.inf, "growth_rate >= 1",
                       "Cap on d's growth per step (d <= d * growth_rate); e.g. 1.02 gives a "
                       "smooth warm-up, inf leaves d unrestricted."),
            HyperParam("fsdp_in_use", False, "True or False",
                       "Parameters are sharded across ranks: all-reduce the two sums of the d "
                       "update (detected automatically for FSDP/DTensor parameters)."),
            HyperParam("slice_p", 1, "integer >= 1",
                       "Compute the d statistics on every slice_p-th element only; saves memory "
                       "for s and x0 (~1/slice_p) at the cost of an approximate d."),
            HyperParam("strict_growth", False, "True or False",
                       "Also bound the first jump away from d0 by growth_rate (prodigyopt does "
                       "not); True gives a gentler start when growth_rate is finite."),
            HyperParam("nonfinite", "raise", "'raise' or 'skip'",
                       "On a NaN/inf gradient statistic: raise naming the parameter, or skip the "
                       "step with a warning; either way nothing is changed."),
            HyperParam("stochastic_rounding", False, "True or False",
                       "Round float16/bfloat16 parameters stochastically (unbiased) when writing "
                       "the float32 result back; no effect on float32/64."),
            HyperParam("independent_ranks", False, "True or False",
                       "Each rank of a process group trains its own model: never communicate "
                       "(by default the first step checks that the ranks hold the same "
                       "parameters, and all-reduces d's sums when they are shards)."),
            HyperParam("split_groups", False, "True or False",
                       "Every param group estimates its own d (own numerator, denominator, "
                       "d_max, growth) and its lr multiplies it: per-group lrs for text "
                       "encoder / U-Net, LoRA+ ratios (lr 1 and 16 for A/B)."),
            HyperParam("d_limit", None, "None or d_limit >= d0",
                       "Absolute maximum for d (a cap); use when d keeps rising late in a run "
                       "and overcooks a LoRA."),
            HyperParam("d_freeze_step", None, "None or an int >= 0",
                       "From this step on d stops updating (the Adam part goes on); use to fix "
                       "the step size once d has settled."),
            HyperParam("diagnose", True, "True or False",
                       "Warn once (ProdigyDiagnosisWarning) when lr is far below 1, when d is "
                       "still d0 after 100 steps (naming the likely cause), or when d grows "
                       "without bound."),
            _foreach(),
            _state_dtype("s, exp_avg and exp_avg_sq (p0 keeps float32: d needs p0 - p "
                         "exactly; None is the parameter's dtype, float32 for float16/bfloat16 "
                         "parameters)"),
        ),
        when_to_use=("When you do not want to tune a learning rate: fine-tuning (LoRA, diffusion "
                     "models), new architectures, quick baselines; matches tuned Adam often."),
        update_rule="""\
dlr = d * lr * bc      (bc = sqrt(1 - beta2^t) / (1 - beta1^t) if use_bias_correction else 1)
g <- grad + weight_decay * theta                         (decouple=False only)
m <- beta1 * m + (1 - beta1) * d * g
v <- beta2 * v + (1 - beta2) * d^2 * g^2
r <- beta3 * r + (d / d0) * dlr * <g, x0 - x>            (summed over all parameters)
s <- beta3 * s + (d / d0) * dlr * g                      (d instead of dlr if safeguard_warmup)
d_hat = d_coef * r / ||s||_1
d <- max(d, d_hat)                                       (only while d == d0: first jump)
d_max <- max(d_max, d_hat) ;  d' = min(d_max, d * growth_rate)
theta <- theta * (1 - weight_decay * dlr)                (decouple=True)
theta <- theta - dlr * m / (sqrt(v) + d' * eps)""",
        tuning=("Keep lr=1.0. Tune d_coef (0.5 = more careful, 2 = more aggressive). With a "
                "schedule use cosine annealing on lr and safeguard_warmup=True for warm-up; "
                "use_bias_correction=True is common for diffusion fine-tuning."),
        pitfalls=("lr is a multiplier on d, not a learning rate: setting lr=1e-4 as for Adam makes "
                  "it ~10^4 times too slow. Param groups with different lrs need "
                  "split_groups=True (each group estimates its own d; without it a group's lr "
                  "must be the largest lr or 0, to freeze). Four full-size buffers: ~2x "
                  "Adam's state memory."),
        aliases=(),
        default_lr=1.0,
        search_space=(SearchDim("d_coef", 0.1, 10.0),),  # lr stays 1: it multiplies d
        needs_lr_tuning=False,
        state_buffers=4,
    ),
)

_FLAT = HyperParam(
    "flat", False, "True or False",
    "Implementation choice only, never the math: keep parameters, gradients and state as views "
    "into one buffer per param group and (device, dtype) and step it in large chunks. Much "
    "faster with many small tensors; zero_grad() then zeroes gradients instead of setting None.")
_COMPILE = HyperParam(
    "compile", False, "True or False",
    "Implementation choice only: run the update as one torch.compile-generated single-pass "
    "kernel (fewer bytes moved per step). The first step compiles (~9 s cold on a 2-core CPU) "
    "and needs a C++ compiler on CPU; best together with flat=True.")
# every optimizer takes flat (OptimizerBase), the classes with a compiled path take compile:
# documented once here and appended to each spec
_SPECS = tuple(
    replace(s, hyperparams=(*s.hyperparams, _FLAT,
                            *((_COMPILE,) if getattr(s.cls, "_has_compiled", False) else ())))
    for s in _SPECS
)

REGISTRY: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}

_ALIASES: dict[str, str] = {a: s.name for s in _SPECS for a in s.aliases}

#: prefix that wraps any registered optimizer in :class:`optimkit.Lookahead`
LOOKAHEAD_PREFIX = "lookahead_"


def _all_names() -> list[str]:
    return sorted([*REGISTRY, *_ALIASES])


def unknown_name_message(name: str, kind: str = "optimizer") -> str:
    """The one message for an unknown registry name: a suggestion and every valid name."""
    candidates = _all_names() + [LOOKAHEAD_PREFIX + n for n in REGISTRY]
    close = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(sorted(REGISTRY))} "
            f"(aliases: {', '.join(sorted(_ALIASES))}; prefix any with {LOOKAHEAD_PREFIX!r}; or "
            "give a dotted class path such as 'torch.optim.NAdam')")


def get_spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name``: case-insensitive, aliases resolved.

    ``lookahead_<name>`` is not an entry of its own: :func:`create_optimizer` strips the prefix
    and wraps the optimizer; ``get_spec`` raises for it, naming the spec to look up instead.

    Raises:
        ValueError: unknown name, with a "did you mean" suggestion and the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    if key.startswith(LOOKAHEAD_PREFIX):
        rest = key[len(LOOKAHEAD_PREFIX):]
        raise ValueError(
            f"{name!r} is the Lookahead wrapper around {rest!r}, not a registry entry; "
            f"use get_spec({rest!r}) for the base optimizer, or create_optimizer({name!r}, ...)"
        )
    raise ValueError(unknown_name_message(name))


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Canonical registry names, sorted, optionally filtered by an ``fnmatch`` pattern.

    Matching is case-insensitive. ``lookahead_<name>`` variants are listed only when the pattern
    mentions ``lookahead`` (``"lookahead_*"``, ``"lookahead_adam*"``): they exist for every
    name, so listing them by default would only double the list. Aliases are not listed.

    >>> list_optimizers("*adam*")
    ['adam', 'adamw', 'radam']
    """
    names = sorted(REGISTRY)
    if pattern is None:
        return names
    pat = pattern.strip().lower()
    if "lookahead" in pat:
        names = names + [LOOKAHEAD_PREFIX + n for n in names]
    return [n for n in names if fnmatch.fnmatchcase(n, pat)]
