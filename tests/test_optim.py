"""The shared Adam (mbrec.optim): fused where torch can, same updates, checkpoints portable."""

from __future__ import annotations

import copy

import torch

from mbrec.optim import adam, fused_supported, load_state


def _run(opt: torch.optim.Optimizer, p: torch.nn.Parameter, grads: list[torch.Tensor]) -> None:
    for g in grads:
        p.grad = g.clone()
        opt.step()


def test_fused_on_cpu_and_same_updates_as_unfused():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 8))
    b = torch.nn.Parameter(a.detach().clone())
    grads = [torch.randn(50, 8) for _ in range(20)]
    fused = adam([a], lr=1e-2, weight_decay=1e-3)
    plain = torch.optim.Adam([b], lr=1e-2, weight_decay=1e-3)
    assert fused.param_groups[0]["fused"] is True
    _run(fused, a, grads)
    _run(plain, b, grads)
    assert torch.allclose(a, b, atol=1e-6)


def test_not_fused_where_unsupported():
    assert not fused_supported([])
    assert not fused_supported([torch.zeros(3, dtype=torch.long)])
    assert adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64).to_sparse())], lr=0.1).param_groups[0].get("fused") in (None, False)


def test_unfused_checkpoint_resumes_fused_with_the_same_trajectory():
    torch.manual_seed(1)
    grads = [torch.randn(10, 4) for _ in range(10)]
    ref = torch.nn.Parameter(torch.randn(10, 4))
    start = ref.detach().clone()
    plain = torch.optim.Adam([ref], lr=1e-2)
    _run(plain, ref, grads[:5])
    mid, state = ref.detach().clone(), copy.deepcopy(plain.state_dict())  # as a checkpoint
    _run(plain, ref, grads[5:])

    p = torch.nn.Parameter(mid.clone())
    opt = adam([p], lr=1e-2)
    load_state(opt, state)
    assert opt.param_groups[0]["fused"] is True
    _run(opt, p, grads[5:])
    assert torch.allclose(p, ref, atol=1e-6)
    assert not torch.equal(start, ref)
