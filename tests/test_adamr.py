"""AdamR-L2 / AdamR-L1 (DAREx AdamR.py; spec dpp_merge.md §2.3, §7.13-15)."""

import copy
import math

import pytest
import torch

from methods import registry
from methods.finetune.adamr import AdamR
from methods.finetune.loop import linear_schedule, param_groups


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x[:, :3] * 2) + 0.5


def _train(model, optimizer, steps=20, schedule=False, zero_grad_step=None):
    x, y = _data()
    scheduler = linear_schedule(optimizer, steps, 0.1) if schedule else None
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(x[step % 4 * 16:(step % 4 + 1) * 16]), y[step % 4 * 16:(step % 4 + 1) * 16])
        loss.backward()
        optimizer.step()
        if scheduler:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["adamr-l2", "adamr-l1"])
def test_strength_zero_is_torch_adam_step_for_step(name):
    ours, ref = _model(), _model()
    opt = registry.get("finetune", name).fn(ours, lr=1e-2, weight_decay=0.01, strength=0.0)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, y = _data()
    for step in range(20):
        for model, optimizer in ((ours, opt), (ref, adam)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert _same(ours, ref), f"diverged at step {step}"


def test_strength_zero_with_decay_to_zero_is_the_registered_adamw_with_schedule():
    ours, ref = _model(), _model()
    _train(ours, registry.get("finetune", "adamr-l2").fn(ours, lr=5e-3, weight_decay=0.05, strength=0.0,
                                                          decay_to_zero=True), schedule=True)
    resolved = registry.get("finetune", "adamw").resolve({}, "finetune")
    _train(ref, registry.get("finetune", "adamw").fn(ref, lr=5e-3, weight_decay=0.05, **resolved), schedule=True)
    assert _same(ours, ref)


class _OfficialAdamR(torch.optim.Optimizer):
    """The released AdamR.step (amsgrad off), minus its per-step deepcopy and prints."""

    def __init__(self, params, pre_model, lr, weight_decay, L1=False, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(pre_model=pre_model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, L1=L1))

    @torch.no_grad()
    def step(self):
        param_size, total = 0, 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_size += p.numel()
                state = self.state[p]
                if len(state) == 0:
                    state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                total += (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sum()
        rms = math.sqrt(total / param_size)
        for group in self.param_groups:
            for p, pre in zip(group["params"], group["pre_model"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["weight_decay"] != 0:
                    rms = rms if rms != 0 else 1
                    drift = torch.sign(p.data - pre) if group["L1"] else p.data - pre
                    p.data.add_(-group["weight_decay"] * group["lr"] / rms * drift)
                beta1, beta2 = group["betas"]
                denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt().add(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** state["step"]))


@pytest.mark.parametrize("l1", [False, True])
def test_matches_the_official_update_over_20_steps(l1):
    ours, ref = _model(), _model()
    theta0 = [p.detach().clone() for p in ref.parameters()]
    opt = AdamR(ours.parameters(), lr=1e-2, strength=0.5, l1=l1)
    official = _OfficialAdamR(ref.parameters(), theta0, lr=1e-2, weight_decay=0.5, L1=l1)
    _train(ours, opt)
    _train(ref, official)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    plain = _model()
    assert not _same(ours, _train(plain, torch.optim.Adam(plain.parameters(), lr=1e-2)))   # the decay acts


@pytest.mark.parametrize("l1", [False, True])
def test_zero_gradients_decay_the_delta_exactly(l1):
    """§7.14: v̂ = 0 ⇒ s = 1 ⇒ L2 multiplies δ by (1 − λ·lr) per step; L1 moves it λ·lr toward θ₀."""
    lr, strength, steps = 0.1, 0.5, 3
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.03]))
    opt = AdamR([p], lr=lr, strength=strength, l1=l1)
    theta0 = p.detach().clone()
    start = torch.tensor([0.5, -0.5, 0.2])
    with torch.no_grad():
        p.add_(start)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    if l1:
        expected = start - steps * lr * strength * start.sign()
    else:
        expected = start * (1 - lr * strength) ** steps
    torch.testing.assert_close((p - theta0).detach(), expected, rtol=1e-5, atol=1e-6)


def test_delta_norm_decreases_monotonically_with_strength():
    """§7.15 on a toy regression: stronger decay toward θ₀ → smaller ‖θ_T − θ₀‖."""
    norms = []
    for strength in (0.0, 1e-3, 1e-2, 1e-1, 1.0):
        model = _model()
        theta0 = copy.deepcopy(model)
        _train(model, AdamR(model.parameters(), lr=1e-2, strength=strength), steps=40)
        norms.append(math.sqrt(sum((p - q).pow(2).sum().item() for p, q in zip(model.parameters(), theta0.parameters()))))
    assert all(a > b for a, b in zip(norms, norms[1:])), norms


def test_l1_makes_more_delta_entries_small_than_l2_at_equal_strength():
    deltas = {}
    for l1 in (False, True):
        model = _model()
        theta0 = [p.detach().clone() for p in model.parameters()]
        _train(model, AdamR(model.parameters(), lr=1e-2, strength=0.3, l1=l1), steps=40)
        deltas[l1] = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(model.parameters(), theta0)])
    tiny = {k: (v.abs() < 2e-3).float().mean().item() for k, v in deltas.items()}
    assert tiny[True] > tiny[False]


def test_theta0_is_the_snapshot_at_construction_and_registry_builds_groups():
    model = _model()
    opt = registry.get("finetune", "adamr-l2").fn(model, lr=1e-3, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]     # budget decay off by default
    assert len(opt.param_groups) == len(param_groups(model, 0.01))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(opt.theta0[model[0].weight], model[0].weight)
    spec = registry.get("finetune", "adamr-l1")
    assert spec.resolve({}, "finetune.optimizers[0].params")["strength"] == 1e-4
    with pytest.raises(registry.MethodConfigError, match="strength"):
        spec.resolve({"strength": -1.0}, "finetune.optimizers[0].params")
    with pytest.raises(ValueError, match="strength"):
        AdamR(model.parameters(), lr=1e-3, strength=-1.0)
