"""PACI's live-weight semantics on stock PyTorch: an update applied between F(j)
and B(j) is seen by B(j)'s input gradient, and B(j)'s weight gradient uses the
activations saved at F(j)."""

import torch

from megatron_paci.config.schema import OptimConfig
from megatron_paci.optim.optimizer import Optimizer
from megatron_paci.parallel.state import single_process


def test_backward_after_an_update_uses_the_live_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(3, 2, bias=False))
    opt = Optimizer(model, OptimConfig(lr=0.1, weight_decay=0.0, clip_grad=0.0),
                    single_process())
    w1_old = model[0].weight.detach().clone()

    # Window 1 on another micro-batch produces gradients for the update.
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()

    # F(j) runs at version 0 ...
    x = torch.randn(5, 4, requires_grad=True)
    y = model(x)
    # ... the stage steps (version 1) while B(j) is still pending ...
    opt.step(lr=0.1)
    w1_new, w2_new = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    assert not torch.equal(w1_new, w1_old)
    opt.zero_grad()
    g = torch.randn(5, 2)
    y.backward(g)  # no "modified by an inplace operation" error

    # Reference by hand: activations from F (old weights), transposes with live weights.
    h_pre = x.detach() @ w1_old.t()
    h = torch.tanh(h_pre)
    g_h = g @ w2_new  # input grad of layer 2 through the live weight
    g_pre = g_h * (1 - h.pow(2))  # tanh' from the saved (old) activation
    torch.testing.assert_close(x.grad, g_pre @ w1_new)
    torch.testing.assert_close(model[2].weight.main_grad, g.t() @ h)  # saved activation h
    torch.testing.assert_close(model[0].weight.main_grad, g_pre.t() @ x.detach())
