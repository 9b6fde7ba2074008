"""ATESD: adaptive teacher exposure for self-distillation (arXiv review in papers/atesd-*).

The teacher sees a fraction rho in [0, 1] of its privileged context c (the reference solution
for OPSD, the peer rollout for SDPO/RLRT): the first ``floor(rho * n)`` of c's n tokens.
rho = 1 returns c untouched, so the teacher view is byte-identical to full exposure.

A controller picks rho. ``fixed:RHO`` always answers RHO (the paper's fixed-exposure sweep);
``atesd`` is the paper's Beta-policy controller:

  state s_k     compact training-state statistics at the start of window k (STAT_NAMES:
                recent reward, loss, entropy, teacher-student mismatch, step fraction), each
                standardised by a running mean/std kept in the controller (step fraction as is);
  policy        rho_k ~ Beta(a(s_k), b(s_k)), a, b = 1 + softplus(linear(s_k)) (a, b > 1: the
                policy is unimodal; ``hidden`` > 0 puts one tanh layer in front of the head);
                the first decision is Beta(init_concentration, init_concentration) -> mean 0.5;
  hold          rho_k is used for ``hold_window`` (H) consecutive student updates;
  progress      m_k = the progress metric of window k: the mean training reward of the batches
                drawn after 1..H updates with rho_k (``AdaptiveExposure``); delta_k = m_k - m_{k-1};
  reward        G_k = sum_{j < L} gamma^j delta_{k+j}: the decision's discounted learning
                progress over its own window and the L - 1 windows after it (L = ``horizon``);
                decision k is therefore scored at the end of window k + L - 1, "at the end of
                later windows", which is how the paper handles delayed credit;
  update        REINFORCE with a running-mean baseline b: loss = -(G_k - b) log pi(rho_k | s_k)
                - entropy_coef * H[pi(. | s_k)], one Adam step (lr = ``lr``) per scored decision.

The review leaves open: the exact feature set and normalisation, the network size, the
baseline, the horizon L and how rho is rounded to tokens; the choices above are ours, each a
field of ``AtesdConfig``. Sampling is deterministic given (seed, decision index) and the
inputs, so every rank (fed the same globally reduced statistics) draws the same rho without
communication, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from megatron_rlrt.algorithms.methods import MethodSpec, register_method

STAT_NAMES = ("reward", "loss", "entropy", "mismatch", "step_fraction")
_RHO_EPS = 1e-4  # Beta's support is open: log-probs of a sampled 0 or 1 are taken at the edge


# -- exposure: a prefix of the context -----------------------------------------------------------


def exposed_token_count(num_tokens: int, rho: float) -> int:
    """floor(rho * n) tokens of an n-token context (rho = 1 -> all, rho = 0 -> none)."""
    _check_rho(rho)
    return min(num_tokens, int(math.floor(rho * num_tokens + 1e-9)))


def expose_prefix_ids(ids: Sequence[int], rho: float) -> list[int]:
    """The first floor(rho * len(ids)) token ids."""
    return list(ids[: exposed_token_count(len(ids), rho)])


def expose_prefix(tokenizer, text: str, rho: float) -> str:
    """The text of the first floor(rho * n) tokens of ``text`` (n in the policy's tokenizer).
    rho = 1 returns ``text`` itself (not a decode round trip), so full exposure is exactly
    today's teacher view."""
    _check_rho(rho)
    if rho >= 1.0 or not text:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(expose_prefix_ids(ids, rho), skip_special_tokens=False)


def expose_contexts(tokenizer, contexts: Sequence[Optional[str]], rho: float) -> list[Optional[str]]:
    """``expose_prefix`` per context; None (no context) stays None."""
    return [None if c is None else expose_prefix(tokenizer, c, rho) for c in contexts]


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"teacher exposure rho must be in [0, 1], got {rho}")


# -- the controller ------------------------------------------------------------------------------


@dataclass
class AtesdConfig:
    hold_window: int = 10  # H: student updates per exposure decision (--atesd-hold-window)
    discount: float = 0.9  # gamma (--atesd-discount)
    lr: float = 1e-2  # Adam learning rate of the controller (--atesd-lr)
    horizon: int = 3  # L: windows of learning progress credited to one decision
    hidden: int = 0  # 0 = linear policy head; > 0 = one tanh layer of this width
    init_concentration: float = 2.0  # first decisions ~ Beta(c, c)
    baseline_momentum: float = 0.9  # b <- m b + (1 - m) G
    entropy_coef: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hold_window < 1:
            raise ValueError(f"--atesd-hold-window must be >= 1, got {self.hold_window}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"--atesd-discount must be in [0, 1], got {self.discount}")
        if self.lr <= 0:
            raise ValueError(f"--atesd-lr must be > 0, got {self.lr}")
        if self.horizon < 1:
            raise ValueError(f"ATESD horizon must be >= 1, got {self.horizon}")
        if self.init_concentration <= 1.0:
            raise ValueError(f"init_concentration must be > 1 (a, b = 1 + softplus), got {self.init_concentration}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {self.baseline_momentum}")


class BetaPolicy(nn.Module):
    """s -> (a, b) of Beta(a, b), a, b > 1."""

    def __init__(self, num_features: int, hidden: int, init_concentration: float):
        super().__init__()
        width = hidden or num_features
        self.body = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh()) if hidden else nn.Identity()
        self.head = nn.Linear(width, 2)
        with torch.no_grad():  # start at Beta(c, c) whatever the state: softplus(z) = c - 1
            self.head.weight.zero_()
            self.head.bias.fill_(math.log(math.expm1(init_concentration - 1.0)))

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = 1.0 + nn.functional.softplus(self.head(self.body(state)))
        return ab[..., 0], ab[..., 1]


class RunningNorm:
    """Running mean/variance (Welford) of the raw statistics; standardises features."""

    def __init__(self, size: int):
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x - self.mean
        std = (self.m2 / (self.count - 1)).sqrt().clamp(min=1e-6)
        return (x - self.mean) / std


class AtesdController:
    """The Beta-policy exposure controller. Use through ``AdaptiveExposure`` (which holds rho
    for H updates) or directly: ``decide(stats)`` at the start of a window, ``finish_window(m)``
    at its end with the progress metric."""

    def __init__(self, config: AtesdConfig, stat_names: Sequence[str] = STAT_NAMES):
        self.config = config
        self.stat_names = tuple(stat_names)
        self.policy = BetaPolicy(len(self.stat_names), config.hidden, config.init_concentration).double()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.norm = RunningNorm(len(self.stat_names))
        self.decisions = 0
        self.baseline: Optional[float] = None
        self.last_metric: Optional[float] = None  # m_{k-1}
        self.pending: list[dict] = []  # decisions awaiting their L windows: state, rho, deltas
        self.last: dict[str, float] = {}  # for logging

    # -- features ------------------------------------------------------------------------------
    def features(self, stats: Mapping[str, float]) -> torch.Tensor:
        missing = [n for n in self.stat_names if n not in stats]
        if missing:
            raise ValueError(f"ATESD controller needs statistics {list(self.stat_names)}; missing {missing}")
        raw = torch.tensor([float(stats[n]) for n in self.stat_names], dtype=torch.float64)
        if not torch.isfinite(raw).all():
            raise ValueError(f"ATESD controller got non-finite statistics {dict(zip(self.stat_names, raw.tolist()))}")
        self.norm.update(raw)
        x = self.norm(raw)
        if "step_fraction" in self.stat_names:  # already in [0, 1]
            i = self.stat_names.index("step_fraction")
            x[i] = raw[i]
        return x

    def distribution(self, state: torch.Tensor) -> torch.distributions.Beta:
        a, b = self.policy(state)
        return torch.distributions.Beta(a, b)

    # -- acting --------------------------------------------------------------------------------
    def decide(self, stats: Mapping[str, float], metric: Optional[float] = None) -> float:
        """Sample rho for the next window. ``metric`` = the progress metric now (m at the start
        of the very first window; later windows take it from ``finish_window``)."""
        if self.last_metric is None and metric is not None:
            self.last_metric = float(metric)
        state = self.features(stats)
        with torch.no_grad():
            dist = self.distribution(state)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed * 1_000_003 + self.decisions)
                rho = float(dist.sample())
        self.decisions += 1
        self.pending.append({"state": state, "rho": rho, "deltas": []})
        self.last.update(rho=rho, beta_a=float(dist.concentration1), beta_b=float(dist.concentration0),
                         beta_mean=float(dist.mean))
        return rho

    def finish_window(self, metric: float) -> dict[str, float]:
        """The progress metric at the end of the current window: credit every open decision
        with gamma^age * delta, and update the policy on those whose L windows are complete."""
        metric = float(metric)
        if not math.isfinite(metric):
            raise ValueError(f"ATESD progress metric is not finite: {metric}")
        delta = 0.0 if self.last_metric is None else metric - self.last_metric
        self.last_metric = metric
        for d in self.pending:
            d["deltas"].append(delta)
        ready = [d for d in self.pending if len(d["deltas"]) >= self.config.horizon]
        self.pending = [d for d in self.pending if len(d["deltas"]) < self.config.horizon]
        logs = {"progress": delta}
        for d in ready:
            logs.update(self._update(d))
        self.last.update(logs)
        return logs

    def _update(self, decision: dict) -> dict[str, float]:
        gamma = self.config.discount
        ret = sum(gamma**j * x for j, x in enumerate(decision["deltas"]))
        baseline = ret if self.baseline is None else self.baseline  # the first return is its own baseline
        advantage = ret - baseline
        m = self.config.baseline_momentum
        self.baseline = m * baseline + (1 - m) * ret
        dist = self.distribution(decision["state"])
        rho = torch.tensor(decision["rho"], dtype=torch.float64).clamp(_RHO_EPS, 1 - _RHO_EPS)
        loss = -advantage * dist.log_prob(rho) - self.config.entropy_coef * dist.entropy()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"reward": ret, "advantage": advantage, "baseline": float(baseline), "pg_loss": float(loss.detach())}

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-able data (tensors as lists; float64 survives JSON exactly), so it rides in
        the trainer's JSON state file and loads at any world size."""
        return to_jsonable({
            "config": asdict(self.config),
            "stat_names": list(self.stat_names),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "norm": {"count": self.norm.count, "mean": self.norm.mean.clone(), "m2": self.norm.m2.clone()},
            "decisions": self.decisions,
            "baseline": self.baseline,
            "last_metric": self.last_metric,
            "pending": [{"state": d["state"].clone(), "rho": d["rho"], "deltas": list(d["deltas"])}
                        for d in self.pending],
        })

    def load_state_dict(self, state: Mapping) -> None:
        state = from_jsonable(state)
        if list(state["stat_names"]) != list(self.stat_names):
            raise ValueError(f"ATESD checkpoint has statistics {state['stat_names']}, this run {list(self.stat_names)}")
        saved = {k: v for k, v in state["config"].items() if k not in ("lr", "seed")}
        ours = {k: v for k, v in asdict(self.config).items() if k not in ("lr", "seed")}
        if saved != ours:
            changed = {k: (saved[k], ours[k]) for k in ours if saved.get(k) != ours[k]}
            raise ValueError(f"ATESD controller settings differ from the checkpoint's (saved, now): {changed}")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.norm.count = int(state["norm"]["count"])
        self.norm.mean = state["norm"]["mean"].clone().double()
        self.norm.m2 = state["norm"]["m2"].clone().double()
        self.decisions = int(state["decisions"])
        self.baseline = state["baseline"]
        self.last_metric = state["last_metric"]
        self.pending = [{"state": d["state"].clone(), "rho": float(d["rho"]), "deltas": list(d["deltas"])}
                        for d in state["pending"]]


def to_jsonable(obj):
    """Tensors -> {"__tensor__": nested list, "dtype": name}, recursively (dict keys -> str)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def from_jsonable(obj):
    """Inverse of ``to_jsonable``; integer-looking dict keys (optimizer param ids) become ints."""
    if isinstance(obj, Mapping):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


# -- exposure schedules, by name -----------------------------------------------------------------


class FixedExposure:
    """``--teacher-exposure fixed:RHO``: the same rho every update (RHO = 1: today's views)."""

    def __init__(self, rho: float):
        _check_rho(rho)
        self.rho = float(rho)

    def rho_for_update(self, update: int, stats: Mapping[str, float], metric: float) -> float:
        return self.rho

    def metrics(self) -> dict[str, float]:
        return {"rho": self.rho}

    def state_dict(self) -> dict:
        return {"rho": self.rho}

    def load_state_dict(self, state: Mapping) -> None:
        pass  # the flag decides; nothing learnt


class AdaptiveExposure:
    """``--teacher-exposure atesd``: a controller decision every H updates, held in between.

    ``metric`` is the progress metric measured at this update, before it trains (the trainer
    passes the batch's mean training reward: the accuracy of the policy as it stands). Window
    k's progress m_k is the mean metric over the H updates that follow its first one (the
    policy after 1..H updates with rho_k), which averages out the noise of single batches;
    m_0 is the metric at the very first update.
    """

    def __init__(self, config: AtesdConfig, stat_names: Sequence[str] = STAT_NAMES):
        self.controller = AtesdController(config, stat_names)
        self.window_start: Optional[int] = None
        self.window_metrics: list[float] = []
        self.rho: Optional[float] = None

    def rho_for_update(self, update: int, stats: Mapping[str, float], metric: float) -> float:
        if self.window_start is not None and update > self.window_start:
            self.window_metrics.append(float(metric))
        if self.window_start is None or update - self.window_start >= self.controller.config.hold_window:
            if self.window_start is not None:
                self.controller.finish_window(sum(self.window_metrics) / len(self.window_metrics))
                self.window_metrics = []
            self.rho = self.controller.decide(stats, metric)
            self.window_start = update
        return self.rho

    def metrics(self) -> dict[str, float]:
        return dict(self.controller.last)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "window_start": self.window_start,
                "window_metrics": list(self.window_metrics), "rho": self.rho}

    def load_state_dict(self, state: Mapping) -> None:
        self.controller.load_state_dict(state["controller"])
        self.window_start = state["window_start"]
        self.window_metrics = [float(x) for x in state["window_metrics"]]
        self.rho = state["rho"]


def parse_teacher_exposure(spec: str, config: Optional[AtesdConfig] = None):
    """``fixed:RHO`` -> FixedExposure, ``atesd`` -> AdaptiveExposure(config)."""
    spec = spec.strip()
    if spec == "atesd":
        return AdaptiveExposure(config or AtesdConfig())
    if spec.startswith("fixed:"):
        try:
            rho = float(spec.split(":", 1)[1])
        except ValueError:
            rho = float("nan")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"--teacher-exposure {spec!r}: RHO must be a number in [0, 1]")
        return FixedExposure(rho)
    raise ValueError(f"--teacher-exposure {spec!r}: expected 'fixed:RHO' (RHO in [0, 1]) or 'atesd'")


# the fixed-exposure sweep of the paper's motivation experiment
SWEEP_RHOS = (0.0, 0.25, 0.5, 0.75, 1.0)


class ExposureSchedule:
    """What the trainer holds (on rank 0, where teacher views are built): the exposure rule of
    ``--teacher-exposure`` and the training statistics its controller reads.

    ``observe(metrics)`` after each RL step keeps the loss (distillation loss if the method has
    one, else the policy-gradient loss), the policy entropy and the teacher-student mismatch
    (``teacher/mismatch``: mean log P_S - log P_T over teacher-row tokens); ``rho(step,
    reward)`` then answers the exposure for the next step's teacher views, with the batch's mean
    reward as both a state statistic and the progress metric.
    """

    LOSS_KEYS = ("loss/distill", "loss/pg")

    def __init__(self, rule, train_iters: int):
        self.rule = rule
        self.train_iters = max(1, int(train_iters))
        self.last = {"loss": 0.0, "entropy": 0.0, "mismatch": 0.0}

    def observe(self, metrics: Mapping[str, float]) -> None:
        loss = next((metrics[k] for k in self.LOSS_KEYS if k in metrics), None)
        for name, value in (("loss", loss), ("entropy", metrics.get("actor/entropy")),
                            ("mismatch", metrics.get("teacher/mismatch"))):
            if value is not None and math.isfinite(float(value)):
                self.last[name] = float(value)

    def rho(self, step: int, reward_mean: float) -> float:
        stats = {"reward": float(reward_mean), **self.last, "step_fraction": step / self.train_iters}
        return self.rule.rho_for_update(step, stats, float(reward_mean))

    def metrics(self) -> dict[str, float]:
        return {f"atesd/{k}": float(v) for k, v in self.rule.metrics().items()}

    def state_dict(self) -> dict:
        return {"rule": to_jsonable(self.rule.state_dict()), "last": dict(self.last)}

    def load_state_dict(self, state: Mapping) -> None:
        self.rule.load_state_dict(from_jsonable(state["rule"]))
        self.last = {k: float(v) for k, v in state["last"].items()}


# ATESD as a method: OPSD (reference-solution teacher, top-K distillation; the paper's base) with
# the adaptive exposure by default. Any teacher method takes --teacher-exposure as well.
register_method(MethodSpec("atesd", teacher_rows="all", loss="distill", context="reference_solution",
                           exposure="atesd"))
