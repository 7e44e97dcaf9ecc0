"""lora_fused.LoraLinears (LoRA layers reading one input, one autograd node) against the same sum
written with autograd's operators: values and the gradients of x, A and each B."""

from __future__ import annotations

import pytest
import torch

from ipylora.engine import lora_fused

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(autouse=True)
def enabled(monkeypatch):
    monkeypatch.setattr(lora_fused, "ENABLED", True)  # off by default (lora_fused.ENABLED says why)


def members(device, dtype, outs=(40, 24, 24), rank=8, width=32, bias=True):
    torch.manual_seed(0)
    bases = []
    for out in outs:
        base = torch.nn.Linear(width, out, bias=bias).to(device, dtype)
        base.requires_grad_(False)
        bases.append(base)
    a = torch.randn(rank * len(outs), width, device=device) * 0.2  # the stacked A, fp32 as PEFT keeps it
    bs = [torch.randn(out, rank, device=device) * 0.2 for out in outs]
    return bases, a, bs


def reference(x, bases, a, bs, scales, p, seed, dtype, autocast):
    """PEFT's sum: base(x) + s * B(A(dropout(x))), the mask drawn once for the shared input."""
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        dropped = torch.nn.functional.dropout(x, p, training=True) if p else x
        h = torch.nn.functional.linear(dropped, a)
        rank = a.shape[0] // len(bases)
        return [base(x) + torch.nn.functional.linear(h[..., i * rank:(i + 1) * rank], b) * s
                for i, (base, b, s) in enumerate(zip(bases, bs, scales))]


def run(fn, x, a, bs, used):
    x, a = x.detach().requires_grad_(), a.detach().requires_grad_()
    bs = [b.detach().requires_grad_() for b in bs]
    outs = fn(x, a, bs)
    torch.manual_seed(11)
    loss = sum((out.float() * torch.randn_like(out.float())).sum() for i, out in enumerate(outs) if i in used)
    loss.backward()
    return [o.detach().float().reshape(-1, o.shape[-1]) for o in outs], x.grad, a.grad, [b.grad for b in bs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p,deferred", [(0.0, False), (0.3, False), (0.3, True)])
def test_values_and_gradients_match_autograd_s(device, p, deferred):
    bases, a, bs = members(device, torch.float32)
    x = torch.randn(2, 7, 32, device=device)
    scales = [2.0, 0.5, 1.0]
    seed = 5

    def fused(x, a, bs):
        torch.manual_seed(seed)
        return lora_fused.lora_linears(x, bases, a, bs, scales, p, deferred)

    def plain(x, a, bs):
        return reference(x, bases, a, bs, scales, p, seed, torch.bfloat16, autocast=False)

    used = {0, 1, 2}
    got, want = run(fused, x, a, bs, used), run(plain, x, a, bs, used)
    for g, w in zip(got[0], want[0]):
        assert torch.allclose(g, w, atol=1e-5)
    for g, w in zip([got[1], got[2], *got[3]], [want[1], want[2], *want[3]]):
        assert g.dtype == w.dtype and torch.allclose(g, w, atol=1e-4, rtol=1e-4)
    assert p == 0.0 or not torch.allclose(got[0][0], bases[0](x).reshape(-1, 40), atol=1e-3)  # the adapter counts


@pytest.mark.parametrize("device", DEVICES)
def test_an_unused_output_and_an_input_without_grad(device):
    """A member whose output feeds nothing gets no B gradient; x without grad gets none computed."""
    bases, a, bs = members(device, torch.float32, bias=False)
    x = torch.randn(9, 32, device=device)
    scales = [1.0, 1.0, 3.0]

    def fused(x, a, bs):
        return lora_fused.lora_linears(x.detach(), bases, a, bs, scales, 0.0, False)

    def plain(x, a, bs):
        return reference(x.detach(), bases, a, bs, scales, 0.0, 0, torch.bfloat16, autocast=False)

    got, want = run(fused, x, a, bs, {0, 2}), run(plain, x, a, bs, {0, 2})
    assert got[1] is None and want[1] is None
    assert got[3][1] is None and torch.allclose(got[2], want[2], atol=1e-4)
    assert torch.allclose(got[3][2], want[3][2], atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_under_bf16_autocast_it_rounds_as_autocast_does(device):
    """bf16 bases, fp32 adapter weights, autocast on (the engine's training): bf16 outputs, fp32
    adapter gradients, within bf16 rounding of autograd's."""
    bases, a, bs = members(device, torch.bfloat16, outs=(64, 16), rank=16, width=64)
    x = torch.randn(3, 11, 64, device=device, dtype=torch.bfloat16)
    scales = [2.0, 2.0]

    def fused(x, a, bs):
        torch.manual_seed(1)
        with torch.autocast(device, dtype=torch.bfloat16):
            assert lora_fused.fusable(bases, x)
            return lora_fused.lora_linears(x, bases, a, bs, scales, 0.1, False)

    def plain(x, a, bs):
        return reference(x, bases, a, bs, scales, 0.1, 1, torch.bfloat16, autocast=True)

    got, want = run(fused, x, a, bs, {0, 1}), run(plain, x, a, bs, {0, 1})
    for g, w in zip(got[0], want[0]):
        assert (g - w).norm() <= 0.01 * w.norm()
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for g, w in zip([got[1], got[2], *got[3]], [want[1], want[2], *want[3]]):
        assert (g.float() - w.float()).norm() <= 0.02 * w.float().norm()


def test_only_frozen_plain_linear_bases_without_hooks_are_fused():
    bases, _, _ = members("cpu", torch.float32)
    x = torch.randn(4, 32)
    assert lora_fused.fusable(bases, x)
    assert not lora_fused.fusable(bases, x.to(torch.float64))
    bases[1].weight.requires_grad_(True)
    assert not lora_fused.fusable(bases, x)
    bases[1].weight.requires_grad_(False)
    handle = bases[2].register_forward_hook(lambda *args: None)
    assert not lora_fused.fusable(bases, x)
    handle.remove()
    assert lora_fused.fusable(bases, x)
