"""
SimbaV2 networks (Lee et al., 2025, "Hyperspherical Normalization for Scalable Deep Reinforcement Learning"):
every hidden vector lives on the unit hypersphere, blocks mix their input and output by a learned interpolation
(LERP) instead of adding them, and learnable per-unit scalers carry the magnitudes that normalization removes.
The weights of the bias-free linear layers are projected back onto the unit sphere after each optimizer step
(:func:`project_weights_`), which is what keeps the effective learning rate from decaying as weights grow.
"""

import math

import torch as th
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def l2_normalize(x: th.Tensor, eps: float = EPS) -> th.Tensor:
    """``x`` divided by its Euclidean norm over the last dimension."""
    return x / (th.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


class Scaler(nn.Module):
    """
    A learned per-unit scale that starts at ``init``: the parameter starts at ``scale`` and is multiplied by
    ``init / scale`` in the forward pass, so ``scale`` sets how fast the optimizer moves it (as in the paper; the
    FastTD3 reference's port starts the parameter at ``init * scale``, i.e. the scale at ``init ** 2``).

    :param dim: number of units
    :param init: initial scale
    :param scale: the parameter's initial value
    """

    def __init__(self, dim: int, init: float, scale: float):
        super().__init__()
        self.scale = nn.Parameter(th.full((dim,), scale))
        self.multiplier = init / scale

    def forward(self, x: th.Tensor) -> th.Tensor:
        return x * (self.scale * self.multiplier)


class HyperLinear(nn.Linear):
    """A bias-free linear layer with orthogonal initialization, whose rows are kept on the unit sphere."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        nn.init.orthogonal_(self.weight)
        with th.no_grad():
            self.weight.copy_(l2_normalize(self.weight))


class Embedder(nn.Module):
    """
    Input embedding: the input with a constant ``shift`` appended (it keeps the input's norm after the
    normalization that follows), projected onto the sphere, then a scaled linear map back onto the sphere.
    """

    def __init__(self, in_dim: int, hidden_dim: int, scaler_init: float, scaler_scale: float, shift: float):
        super().__init__()
        self.shift = shift
        self.linear = HyperLinear(in_dim + 1, hidden_dim)
        self.scaler = Scaler(hidden_dim, scaler_init, scaler_scale)

    def forward(self, x: th.Tensor) -> th.Tensor:
        x = l2_normalize(F.pad(x, (0, 1), value=self.shift))
        return l2_normalize(self.scaler(self.linear(x)))


class LERPBlock(nn.Module):
    """
    A residual block: an inverted-bottleneck MLP whose output (on the sphere) is linearly interpolated with the
    block's input by a learned per-unit rate ``alpha``, then normalized again.
    """

    def __init__(
        self, hidden_dim: int, scaler_init: float, scaler_scale: float, alpha_init: float, alpha_scale: float, expansion: int
    ):
        super().__init__()
        inner = hidden_dim * expansion
        self.up = HyperLinear(hidden_dim, inner)
        self.up_scaler = Scaler(inner, scaler_init / math.sqrt(expansion), scaler_scale / math.sqrt(expansion))
        self.down = HyperLinear(inner, hidden_dim)
        self.alpha = Scaler(hidden_dim, alpha_init, alpha_scale)

    def forward(self, x: th.Tensor) -> th.Tensor:
        # The small constant keeps a vector whose units are all inactive off the origin
        hidden = F.relu(self.up_scaler(self.up(x))) + EPS
        update = l2_normalize(self.down(hidden))
        return l2_normalize(x + self.alpha(update - x))


class Head(nn.Module):
    """The output layers: a scaled linear map, then a linear map with a bias (no normalization of the output)."""

    def __init__(self, hidden_dim: int, out_dim: int):
        super().__init__()
        self.hidden = HyperLinear(hidden_dim, hidden_dim)
        self.scaler = Scaler(hidden_dim, 1.0, 1.0)
        self.out = HyperLinear(hidden_dim, out_dim)
        self.bias = nn.Parameter(th.zeros(out_dim))

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.out(self.scaler(self.hidden(x))) + self.bias


class SimbaV2Network(nn.Sequential):
    """
    Embedder, ``num_blocks`` LERP blocks of width ``hidden_dim``, output head (and ``tanh`` with
    ``squash_output``). The initial scales follow the paper: ``sqrt(2 / hidden_dim)`` for the scalers,
    ``1 / (num_blocks + 1)`` for the interpolation rates.

    :param in_dim: input size
    :param out_dim: output size
    :param hidden_dim: width of the hidden vectors
    :param num_blocks: number of LERP blocks
    :param squash_output: end with ``tanh``
    :param expansion: width of each block's inner layer, in multiples of ``hidden_dim``
    :param shift: the constant appended to the input before it is normalized
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        num_blocks: int,
        squash_output: bool = False,
        expansion: int = 4,
        shift: float = 3.0,
    ):
        scaler = math.sqrt(2.0 / hidden_dim)
        alpha_init, alpha_scale = 1.0 / (num_blocks + 1), 1.0 / math.sqrt(hidden_dim)
        layers: list[nn.Module] = [Embedder(in_dim, hidden_dim, scaler, scaler, shift)]
        layers += [LERPBlock(hidden_dim, scaler, scaler, alpha_init, alpha_scale, expansion) for _ in range(num_blocks)]
        layers.append(Head(hidden_dim, out_dim))
        if squash_output:
            layers.append(nn.Tanh())
        super().__init__(*layers)


def hyperspherical_weights(module: nn.Module) -> list[th.Tensor]:
    """The weights of every :class:`HyperLinear` in ``module``: those :func:`project_weights_` keeps normalized."""
    return [layer.weight for layer in module.modules() if isinstance(layer, HyperLinear)]


@th.no_grad()
def project_weights_(weights: list[th.Tensor]) -> None:
    """Put every row (the weights into one unit) of each matrix back on the unit sphere, in place."""
    for weight in weights:
        weight.div_(th.linalg.vector_norm(weight, dim=1, keepdim=True) + EPS)
