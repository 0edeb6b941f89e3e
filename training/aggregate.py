"""FedAvg aggregation: pure arithmetic over state dicts and sample counts (McMahan et al. 2017).

A cohort is summed one client at a time (``accumulate``), so memory does not grow with the number of clients.
Only floating-point entries are averaged; integer buffers (``position_ids`` and the like) are copied from the
global model, never averaged.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def accumulate(total: State | None, state: State, weight: float) -> State:
    """``total + weight * state`` over the float entries; updates ``total`` in place (None starts a new sum)."""
    if total is None:
        return {k: v.detach().float() * weight for k, v in state.items() if v.is_floating_point()}
    # one multi-tensor add: a GPU launches one kernel for the whole model, not one per tensor
    keys = list(total)
    torch._foreach_add_([total[k] for k in keys], [state[k].detach().to(total[k].dtype) for k in keys], alpha=weight)
    return total


def average(total: State, total_weight: float, global_state: State) -> State:
    """The weighted mean from a sum; entries that were not averaged come from ``global_state`` unchanged."""
    if total_weight <= 0:
        raise ValueError("cannot average a cohort with no samples")
    return {
        k: (total[k] / total_weight).to(v.dtype) if k in total else v.clone() for k, v in global_state.items()
    }


def server_update(global_state: State, mean_state: State, server_lr: float) -> State:
    """Move the global model towards the client mean by ``server_lr`` (1.0 = plain FedAvg: take the mean).

    The mean minus the global model is the pseudo-gradient a server optimizer would consume.
    """
    if server_lr == 1.0:
        return mean_state
    return {
        k: g + server_lr * (mean_state[k] - g) if g.is_floating_point() else g for k, g in global_state.items()
    }
