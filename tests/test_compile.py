"""runtime.compile: the model compiled in place (torch.compile) trains as the eager one does.

One test: compiling the tiny model's training step takes one to three minutes on two CPU cores. It uses LoRA, the
harder case (a peft wrapper compiled, a state dict of adapters loaded into it per client); full fine-tuning compiles
the same way, one module less.
"""

import pytest
import torch

from training.client import train_client
from training.federation import build


@pytest.mark.slow
def test_a_compiled_lora_client_trains_to_the_eager_ones_losses(tiny, monkeypatch):
    # inductor draws dropout masks with its own generator unless told to call eager's, which the comparison needs
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # 5 clients of 48 texts: 3 steps, each batch at max_length (32) so one shape is compiled once
    settings = ("fl.num_clients=5", "peft.method=lora")
    eager, compiled = build(tiny(*settings)), build(tiny(*settings, "runtime.compile=true"))
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    assert compiled.shared().keys() == eager.shared().keys()  # no _orig_mod. prefix: clients load the same names

    def train(federation):
        start = federation.global_state()
        result = train_client(federation.model, start, federation.encoded["train"], federation.parts[0],
                              federation.collate, federation.config.client, federation.seed_for(1, 0),
                              federation.where, 0)
        moved = sum(not torch.equal(start[k], v) for k, v in federation.shared().items())
        return result, moved

    (want, eager_moved), (got, compiled_moved) = train(eager), train(compiled)
    assert got.steps == want.steps == 3
    assert compiled_moved == eager_moved > 0  # the adapters and the head were trained
    assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)
