"""
Several MLPs of one shape evaluated together: each layer is one batched matrix product over the networks
(``baddbmm``) instead of one matrix product per network, so the twin critics cost one operator per layer and the
networks split evenly across threads.
"""

import math
from itertools import pairwise

import torch as th
import torch.nn.functional as F
from torch import nn


class BatchedLinear(nn.Module):
    """
    ``n`` independent linear layers of one shape (initialized as ``nn.Linear`` initializes each by
    :meth:`reset_parameters`).

    :param n: number of layers
    :param in_features: input size
    :param out_features: output size
    :param initialize: initialize the layers one after another (``False``: the caller does, e.g. in the order of
        the networks they belong to)
    """

    def __init__(self, n: int, in_features: int, out_features: int, initialize: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # (n, out, in) as nn.Linear stores one weight, so that stacking Linear weights gives this layout
        self.weight = nn.Parameter(th.empty(n, out_features, in_features))
        self.bias = nn.Parameter(th.empty(n, 1, out_features))
        if initialize:
            for index in range(n):
                self.reset_parameters(index)

    @th.no_grad()
    def reset_parameters(self, index: int) -> None:
        """Initialize layer ``index`` as ``nn.Linear`` does (the same random draws, in the same order)."""
        nn.init.kaiming_uniform_(self.weight[index], a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.bias[index], -bound, bound)

    def forward(self, x: th.Tensor, n: int | None = None) -> th.Tensor:
        """
        :param x: inputs, shape (n, batch, in_features)
        :param n: use the first ``n`` layers only (``None``: all; ``x`` then has ``n`` rows)
        :return: shape (n, batch, out_features)
        """
        return th.baddbmm(self.bias[:n], x, self.weight[:n].transpose(1, 2))

    def extra_repr(self) -> str:
        return f"n={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class BatchedLayerNorm(nn.Module):
    """
    ``n`` LayerNorms over the last dimension, each with its own scale and shift.

    :param n: number of networks
    :param dim: normalized size
    :param eps: added to the variance
    """

    def __init__(self, n: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(th.ones(n, 1, dim))
        self.bias = nn.Parameter(th.zeros(n, 1, dim))

    def forward(self, x: th.Tensor, n: int | None = None) -> th.Tensor:
        normalized = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return th.addcmul(self.bias[:n], normalized, self.weight[:n])


class BatchedMLP(nn.Module):
    """
    ``n`` MLPs of one shape (SB3's ``create_mlp`` layout: hidden Linear, optional LayerNorm, activation; a Linear
    output) reading the same input, evaluated as one batched matrix product per layer.

    :param n: number of networks
    :param in_dim: input size
    :param out_dim: output size
    :param net_arch: hidden sizes
    :param activation_fn: activation after each hidden layer
    :param layer_norm: LayerNorm after each hidden Linear layer
    """

    def __init__(
        self,
        n: int,
        in_dim: int,
        out_dim: int,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.ReLU,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.n = n
        sizes = [in_dim, *net_arch, out_dim]
        self.linears: list[BatchedLinear] = nn.ModuleList(  # type: ignore[assignment]
            BatchedLinear(n, size_in, size_out, initialize=False) for size_in, size_out in pairwise(sizes)
        )
        self.norms: list[BatchedLayerNorm] | None = (
            nn.ModuleList(BatchedLayerNorm(n, size) for size in net_arch) if layer_norm else None  # type: ignore[assignment]
        )
        self.activation = activation_fn()
        # Network by network, layer by layer: the random draws of n ``create_mlp`` networks made one after another,
        # so that a seed gives the batched critic the parameters it gives the plain one
        for index in range(n):
            for linear in self.linears:
                linear.reset_parameters(index)

    def forward(self, x: th.Tensor, n: int | None = None) -> th.Tensor:
        """
        :param x: the input all networks read, shape (batch, in_dim)
        :param n: evaluate the first ``n`` networks only (``None``: all)
        :return: shape (n, batch, out_dim)
        """
        hidden = x.expand(self.n if n is None else n, *x.shape)
        for index, linear in enumerate(self.linears):
            hidden = linear(hidden, n)
            if index < len(self.linears) - 1:
                if self.norms is not None:
                    hidden = self.norms[index](hidden, n)
                hidden = self.activation(hidden)
        return hidden
