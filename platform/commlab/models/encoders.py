"""Per-modality encoders. Each maps (x, pad) to (features, pad) and exposes `out_dim`.

Output shapes: image encoders give feature maps (B, C, h, w); sequence encoders give (B, T, d)
and pass the padding mask through; vector encoders give (B, d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from commlab.models.dropout import EncoderLayer
from commlab.registry import Registry

ENCODERS: Registry[type[nn.Module]] = Registry("encoder")


def conv_input(x: Tensor, first: nn.Module) -> Tensor:
    """`x` as `first` (a stack's first conv) reads it: channels-last when the conv weights are
    (`train.channels_last`), in the autocast dtype when autocast is on. Left to the conv, that
    is a cast, a channels-last copy in the forward and one more in the backward, which lays out
    the saved (cast, NCHW) input again. Cast first: a converting channels-last copy took 2.8x
    as long as the cast and then the copy (128 x 3 x 64 x 64 on 2 CPU cores)."""
    if not isinstance(first, nn.Conv2d):
        return x
    if not first.weight.is_contiguous(memory_format=torch.channels_last):
        return x
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(kind))
    return x.contiguous(memory_format=torch.channels_last)


@ENCODERS.register("conv")
class ConvImageEncoder(nn.Module):
    """Small AlexNet-like conv stack for low-resolution images (random init).

    conv5x5/2 -> pool -> conv3x3 -> pool -> 3 x conv3x3, widths (w, 2w, 4w, 4w, out), then an
    adaptive average pool to a `grid` x `grid` map. Input (B, C, H, W) float; output
    (B, out_channels, grid, grid). `norm` adds BatchNorm after every conv (faster, more stable
    contrastive training on small data); AlexNet itself has none.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        out_channels: int = 128,
        grid: int = 4,
        norm: bool = True,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if width <= 0 or out_channels <= 0 or grid <= 0:
            raise ValueError("conv encoder: width, out_channels and grid must be positive")
        if input_size is not None and input_size < 16:
            raise ValueError(f"conv encoder: input_size={input_size} is below the minimum of 16")
        w = width

        def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=not norm)]
            if norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            return layers

        self.features = nn.Sequential(
            *block(in_channels, w, 5, stride=2),
            nn.MaxPool2d(2),
            *block(w, 2 * w, 3),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w, 3),
            *block(4 * w, 4 * w, 3),
            *block(4 * w, out_channels, 3),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = out_channels
        self.grid = grid

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.pool(self.features(conv_input(x, self.features[0]))), None


@ENCODERS.register("transformer")
class SequenceTransformer(nn.Module):
    """Per-timestep linear map (no bias) + pre-LN TransformerEncoder; padding is masked.

    Input (B, T, in_dim) with pad (B, T) True = padding; output (B, T, d_model), same pad.
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 40,
        n_layers: int = 5,
        n_heads: int = 5,
        ff_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"transformer encoder: d_model={d_model} not divisible by n_heads={n_heads}"
            )
        self.proj = nn.Linear(in_dim, d_model, bias=False)
        layer = EncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_dim = d_model

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.encoder(self.proj(x), src_key_padding_mask=pad)
        if pad is not None:
            h = h.masked_fill(pad.unsqueeze(-1), 0.0)
        return h, pad


@ENCODERS.register("gru")
class GRUEncoder(nn.Module):
    """GRU over (B, T, in_dim), returning the full output sequence (B, T, hidden).

    Sequences are right-padded, so outputs at valid steps never see padding.
    """

    def __init__(self, in_dim: int, hidden: int = 512, n_layers: int = 1) -> None:
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, n_layers, batch_first=True)
        self.out_dim = hidden

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h, _ = self.gru(x)
        if pad is not None:
            h = h.masked_fill(pad.unsqueeze(-1), 0.0)
        return h, pad


@ENCODERS.register("mlp")
class MLPEncoder(nn.Module):
    """MLP on (B, in_dim) vectors: Linear -> ReLU -> ... -> Linear, output (B, out_dim)."""

    def __init__(self, in_dim: int, hidden: list[int] | None = None, out_dim: int = 10) -> None:
        super().__init__()
        dims = [in_dim, *(hidden or []), out_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.net(x.flatten(1)), None


@ENCODERS.register("embedding")
class TokenEmbedding(nn.Module):
    """Trainable token embedding for text ids (B, L) -> (B, L, dim), padding passed through.

    With a small Transformer on top this is the fallback text encoder when no pretrained
    sentence encoder is available locally.
    """

    def __init__(
        self, vocab_size: int, dim: int = 128, n_layers: int = 2, n_heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, 512, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = EncoderLayer(dim, n_heads, 4 * dim, 0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_dim = dim

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        return self.encoder(h, src_key_padding_mask=pad), pad


@ENCODERS.register("alexnet")
class AlexNetEncoder(nn.Module):
    """The convolutional `features` stack of AlexNet (torchvision's layout, random init), the
    paper's Trifeatures encoder, written in plain torch (torchvision is not importable beside every
    torch build).

    conv11/4 64 -> ReLU -> maxpool3/2 -> conv5 192 -> ReLU -> maxpool3/2 -> conv3 384 -> ReLU
    -> conv3 256 -> ReLU -> conv3 256 -> ReLU -> maxpool3/2, then an adaptive average pool to a
    `grid` x `grid` map (AlexNet's is 6). Input (B, C, H, W) float, H, W >= 63; output
    (B, 256, grid, grid): (B, 256, 6, 6) at 224 px, i.e. 36 tokens through the `patch` adapter.
    """

    def __init__(self, in_channels: int = 3, grid: int = 6) -> None:
        super().__init__()
        if in_channels <= 0 or grid <= 0:
            raise ValueError("alexnet encoder: in_channels and grid must be positive")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = 256
        self.grid = grid

    def forward(self, x: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if x.dim() != 4 or min(x.shape[-2:]) < 63:
            raise ValueError(
                f"alexnet encoder expects (B, C, H, W) with H, W >= 63, got {tuple(x.shape)}"
            )
        return self.pool(self.features(conv_input(x, self.features[0]))), None
