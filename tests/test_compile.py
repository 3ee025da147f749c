"""torch.compile of a whole training step that calls SMES.step (CPU; the GPU run is issue 6's)."""

import pytest
import torch
from oracle import host_backends

import smes_fused


def _make(groups):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ps = list(m.parameters())
    if groups == "one":
        opt = smes_fused.SMES(ps, exponent=-0.08, lr=1e-2)
    else:  # groups that differ in whether v and v_max exist: the fused op is split by kind
        opt = smes_fused.SMES(
            [
                dict(params=ps[0:1], exponent=0.0),
                dict(params=ps[1:2], exponent=0.5, amsgrad=True),
                dict(params=ps[2:], exponent=-0.08),
            ],
            lr=1e-2,
        )
    return m, opt


@pytest.mark.skipif("cpu" not in host_backends(), reason="needs the compiled cpu backend")
@pytest.mark.parametrize("groups", ["one", "mixed"])
def test_compiled_training_step_matches_eager(groups):
    x, y = torch.randn(64, 16), torch.randn(64, 4)

    def train_step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    torch._dynamo.reset()
    m1, o1 = _make(groups)
    m2, o2 = _make(groups)
    compiled = torch.compile(train_step)
    for _ in range(4):
        train_step(m1, o1)
        compiled(m2, o2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert o1.state[p].keys() == o2.state[q].keys()
        assert o2.state[q]["step"].item() == 4
