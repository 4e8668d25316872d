"""The conv encoders' input layout (`encoders.conv_input`)."""

from __future__ import annotations

import copy

import pytest
import torch

from commlab.models.encoders import AlexNetEncoder, ConvImageEncoder, conv_input


def test_conv_input_follows_the_weights_layout_and_autocast():
    x = torch.randn(2, 3, 16, 16)
    conv = torch.nn.Conv2d(3, 4, 3)
    assert conv_input(x, conv) is x  # NCHW weights: left as it is
    conv.to(memory_format=torch.channels_last)
    y = conv_input(x, conv)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_input(x, conv)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
    ("make", "size"),
    [(lambda: ConvImageEncoder(width=4, out_channels=8), 32), (AlexNetEncoder, 67)],
)
def test_channels_last_encoders_equal_nchw_ones_with_gradients(make, size, bf16):
    torch.manual_seed(0)
    nchw = make()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, size, size)
    outs, grads = [], []
    for enc in (nchw, cl):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h, _ = enc(x)
        assert h.dtype == (torch.bfloat16 if bf16 else torch.float32)
        h.float().square().sum().backward()
        outs.append(h.float())
        grads.append([p.grad for p in enc.parameters()])
    tol = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for a, b in zip(*grads, strict=True):
        gtol = 5e-2 if bf16 else 1e-3  # the two layouts run different conv algorithms
        torch.testing.assert_close(b, a, rtol=gtol, atol=gtol)
