"""Server strategies: how the global model moves towards the cohort's mean, and the FedProx term of the client loss.

The server sees the pseudo-gradient Δ = mean − global (float entries only; integer buffers stay as they are) and
applies FedAvg, FedAvgM (Hsu et al. 2019) or an adaptive optimizer: FedAdam, FedYogi, FedAdagrad (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2). A strategy keeps its state (momentum, first and second
moments) as float32 tensors under flat names ("m.<param>", "v.<param>"), so a checkpoint holds it in safetensors and
a resumed run continues bit-identically. Plain floats in, no config, no MLflow, no I/O.
"""

from __future__ import annotations

import abc
import math

import torch

from training import aggregate

State = dict[str, torch.Tensor]


class _Buffers:
    """Per-parameter float32 state in named slots ("m", "v"), created on the first round from the model's shapes.

    A step replaces each tensor rather than changing it in place, so a ``state()`` handed to a checkpoint, or a
    loaded one, never changes under its holder.
    """

    slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._buffers: dict[str, State] = {slot: {} for slot in self.slots}

    def state(self) -> State:
        return {f"{slot}.{key}": t.detach().cpu() for slot, buf in self._buffers.items() for key, t in buf.items()}

    def load(self, state: State) -> None:
        buffers: dict[str, State] = {slot: {} for slot in self.slots}
        for name, tensor in state.items():
            slot, _, key = name.partition(".")
            if slot not in buffers:
                raise ValueError(f"server state entry {name!r} is not kept by this strategy (it keeps "
                                 f"{list(self.slots) or 'no state'}): the checkpoint was written with another "
                                 f"fl.strategy; resume with that one")
            buffers[slot][key] = tensor.to(torch.float32)
        self._buffers = buffers

    def _prepare(self, global_state: State, fills: dict[str, float]) -> None:
        """Fill empty slots (the first round) or check that loaded ones fit the model and sit on its device."""
        floats = {k: g for k, g in global_state.items() if g.is_floating_point()}
        for slot, fill in fills.items():
            buf = self._buffers[slot]
            if not buf:
                buf.update({k: torch.full(g.shape, fill, dtype=torch.float32, device=g.device)
                            for k, g in floats.items()})
                continue
            misfits = sorted(set(buf) ^ set(floats)) or [k for k in floats if buf[k].shape != floats[k].shape]
            if misfits:
                raise ValueError(f"server state '{slot}.{misfits[0]}' does not fit the model's weights: the "
                                 f"checkpoint was written for another model")
            for k, g in floats.items():
                buf[k] = buf[k].to(g.device)


def _metrics(old: State, new: State, second_moment: State | None = None) -> dict[str, float]:
    """The L2 norm of the change the server applied and, for adaptive strategies, the mean second moment.

    Summed with ``math.fsum`` (exact, so independent of the order): a resumed run's state comes from a checkpoint
    with its keys in another order, and its metrics must still equal the uninterrupted run's.
    """
    floats = [k for k, g in old.items() if g.is_floating_point()]
    squares = math.fsum(float(torch.linalg.vector_norm(new[k].float() - old[k].float())) ** 2 for k in floats)
    metrics = {"server_update_norm": math.sqrt(squares)}
    if second_moment is not None:
        total = math.fsum(float(v.double().sum()) for v in second_moment.values())
        metrics["server_second_moment_mean"] = total / sum(v.numel() for v in second_moment.values())
    return metrics


class FedAvgM(_Buffers):
    """Server momentum (Hsu et al. 2019): m ← β·m + Δ, x ← x + η·m. β = 0 is FedAvg with server lr η."""

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.0):
        self.slots = ("m",) if server_momentum else ()
        super().__init__()
        self.server_lr, self.server_momentum = server_lr, server_momentum

    def step(self, global_state: State, mean_state: State) -> tuple[State, dict[str, float]]:
        """The next global model and this round's server metrics."""
        if not self.server_momentum:
            # today's FedAvg code path, so η = 1 returns the mean itself: global + (mean − global) is not
            # bit-identical to the mean in floating point
            new = aggregate.server_update(global_state, mean_state, self.server_lr)
            return new, _metrics(global_state, new)
        self._prepare(global_state, {"m": 0.0})
        m, new = self._buffers["m"], dict(global_state)
        for k in m:
            m[k] = self.server_momentum * m[k] + (mean_state[k].float() - global_state[k].float())
            new[k] = (global_state[k].float() + self.server_lr * m[k]).to(global_state[k].dtype)
        return new, _metrics(global_state, new)


class FedAvg(FedAvgM):
    """McMahan et al. 2017: x ← x + η·Δ; η = 1 takes the cohort's mean."""

    def __init__(self, server_lr: float = 1.0):
        super().__init__(server_lr, 0.0)


class Adaptive(_Buffers, abc.ABC):
    """Reddi et al. 2021, Algorithm 2: m ← β1·m + (1 − β1)·Δ; v by the variant; x ← x + η·m / (√v + τ).

    As in the paper, neither moment is bias-corrected. The second moment starts at v₋₁ = τ², the smallest value
    the paper allows (Flower starts at 0, below it), so the first rounds' steps are not damped by a larger floor;
    m starts at 0.
    """

    slots = ("m", "v")

    def __init__(self, server_lr: float, server_beta1: float = 0.9, server_beta2: float = 0.99,
                 server_tau: float = 1e-3):
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, server_beta1, server_beta2, server_tau

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, delta_squared: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Δ², the one line in which the variants differ."""

    def step(self, global_state: State, mean_state: State) -> tuple[State, dict[str, float]]:
        """The next global model and this round's server metrics."""
        self._prepare(global_state, {"m": 0.0, "v": self.tau ** 2})
        m, v, new = self._buffers["m"], self._buffers["v"], dict(global_state)
        for k in m:
            delta = mean_state[k].float() - global_state[k].float()
            m[k] = self.beta1 * m[k] + (1 - self.beta1) * delta
            v[k] = self.second_moment(v[k], delta * delta)
            step = self.server_lr * m[k] / (v[k].sqrt() + self.tau)
            new[k] = (global_state[k].float() + step).to(global_state[k].dtype)
        return new, _metrics(global_state, new, v)


class FedAdam(Adaptive):
    def second_moment(self, v, delta_squared):
        return self.beta2 * v + (1 - self.beta2) * delta_squared


class FedYogi(Adaptive):
    # v moves by (1 − β2)·Δ² towards Δ², not by a share of the gap as in Adam, so after a burst of large updates
    # the step size grows back slowly (Zaheer et al. 2018)
    def second_moment(self, v, delta_squared):
        return v - (1 - self.beta2) * delta_squared * torch.sign(v - delta_squared)


class FedAdagrad(Adaptive):
    def __init__(self, server_lr: float, server_beta1: float = 0.9, server_tau: float = 1e-3):
        super().__init__(server_lr, server_beta1, 0.0, server_tau)  # Adagrad's sum has no β2

    def second_moment(self, v, delta_squared):
        return v + delta_squared


# name -> class; training/config.py holds each one's parameters (STRATEGY_PARAMS) and checks them before a run
STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedAvg,  # FedAvg on the server; the proximal term is in the client loss
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def make(name: str, **params: float) -> FedAvgM | Adaptive:
    """``make("fedadam", server_lr=1e-3, server_tau=1e-3)``: unset parameters take defaults (the adaptive ones have
    no default server_lr: FedAvg's 1.0 would move every weight by about 1 per round). The values come checked from
    the config (``training.config.check_strategy``); this module stays arithmetic."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: must be one of {tuple(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](**params)


class _Proximal(torch.autograd.Function):
    """½·||w − w₀||² whose backward recomputes w − w₀: autograd saves only w and w₀, which are held anyway, where
    ``(w - w0).pow(2)`` would keep the difference of every weight alive until backward: a second model in memory."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, anchor)
        return 0.5 * (weight - anchor).pow(2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight, anchor = ctx.saved_tensors
        return grad * (weight - anchor), None


def proximal_term(model: torch.nn.Module, global_state: State, mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): μ/2·Σ||w − w_global||² over the trainable weights, against the global tensors the
    client started from; differentiable in the weights, with gradient μ·(w − w_global)."""
    terms = [_Proximal.apply(w, global_state[name].detach().to(w.device, w.dtype))
             for name, w in model.named_parameters() if w.requires_grad]
    return mu * torch.stack(terms).sum()


# scheme -> a client's weight in the cohort mean, from its sample count
WEIGHTINGS = {
    "samples": float,  # McMahan et al.: in proportion to the data a client holds
    "uniform": lambda num_samples: 1.0,  # the paper's sites count equally, however much data each holds
}


def client_weight(num_samples: int, scheme: str) -> float:
    """A client's weight in the cohort mean; per client, so the executor's running sum can use it as each finishes."""
    if scheme not in WEIGHTINGS:
        raise ValueError(f"weighting: must be one of {tuple(WEIGHTINGS)}, got {scheme!r}")
    return WEIGHTINGS[scheme](num_samples)
