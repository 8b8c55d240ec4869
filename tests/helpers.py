"""Small helpers shared by the defense tests."""

import torch


def sgd_update(model, lr=0.05):
    """An `update(loss)` like the training loop's: zero, backward, SGD step on `model`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return update


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]
