"""Actor, distributional twin critic and the policy that holds them with the observation normalizer."""

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BaseModel, BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.utils import get_device
from torch import nn

from sb3_fasttd3.common.batched_mlp import BatchedMLP
from sb3_fasttd3.common.distributional import expected_value, make_support
from sb3_fasttd3.common.normalization import DictNormalization, EmpiricalNormalization, MergeMoments, make_normalizer
from sb3_fasttd3.common.preprocessing import make_preprocessor
from sb3_fasttd3.common.simbav2 import SimbaV2Network
from sb3_fasttd3.common.utils import is_integer

# The networks behind the actor and each Q-network: SB3's MLP, or SimbaV2's hyperspherical residual blocks
ARCHITECTURES = ("mlp", "simbav2")

# Observation keys of the asymmetric actor-critic setups we know: (actor keys, critic keys)
ASYMMETRIC_KEYS = (
    (["state"], ["privileged_state"]),  # MuJoCo Playground
    (["policy"], ["critic"]),  # Isaac Lab observation groups
)


def _flatten_keys(extractor: nn.Module, space: spaces.Space, normalize_images: bool) -> tuple[str, ...] | None:
    """
    When ``preprocess_obs`` then ``extractor`` amount to flattening float vectors (SB3's ``FlattenExtractor`` on a
    vector ``Box``, or a ``CombinedExtractor`` of such keys), the keys to flatten and concatenate (``("",)`` for a
    ``Box``): the networks then skip the module calls, so the MLP policies cost what a plain MLP does. Else None.
    """

    def is_float_vector(subspace: spaces.Space) -> bool:
        return isinstance(subspace, spaces.Box) and not (normalize_images and is_image_space(subspace))

    if type(extractor) is FlattenExtractor and is_float_vector(space):
        return ("",)
    if type(extractor) is CombinedExtractor and isinstance(space, spaces.Dict):
        modules = extractor.extractors
        if all(type(modules[key]) is nn.Flatten and is_float_vector(space[key]) for key in modules):
            return tuple(modules.keys())
    return None


def _copy_normalizer_statistics(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """
    The normalizer's statistics are saved under each module that holds it (the policy, the actor, its target and
    average); a state dict that has them under the policy's ``obs_normalizer.`` only (as saved before the actor held
    the normalizer) gets them copied to the others, so that it still loads.
    """
    own = prefix + "obs_normalizer."
    for key in [key for key in state_dict if key.startswith(own)]:
        for holder in ("actor.", "actor_target.", "actor_average."):
            if getattr(module, holder[:-1], None) is not None:
                state_dict.setdefault(prefix + holder + key[len(prefix) :], state_dict[key])


def _match_actor_average(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """
    A state dict saved without an actor average loads into a policy that keeps one as the actor itself (the average
    starts there); one saved with an average loads into a policy that keeps none without it.
    """
    actor, average = prefix + "actor.", prefix + "actor_average."
    saved = [key for key in state_dict if key.startswith(average)]
    if getattr(module, "actor_average", None) is None:
        for key in saved:
            del state_dict[key]
    elif not saved:
        for key in [key for key in state_dict if key.startswith(actor)]:
            state_dict[average + key[len(actor) :]] = state_dict[key]


def default_optimizer_kwargs(optimizer_class: type[th.optim.Optimizer], architecture: str = "mlp") -> dict[str, Any]:
    """
    The optimizer arguments when ``optimizer_kwargs`` is not given: the reference's weight decay for AdamW (none
    for SimbaV2, whose weights are projected back onto the sphere), and for the Adam family one fused kernel for
    all parameters (about 5x faster than the default on a CPU). Any other optimizer gets its own defaults, as in SB3.
    """
    kwargs: dict[str, Any] = {}
    if issubclass(optimizer_class, th.optim.AdamW):
        kwargs["weight_decay"] = 0.0 if architecture == "simbav2" else 0.1
    if issubclass(optimizer_class, th.optim.Adam):  # AdamW included
        kwargs["fused"] = True
    return kwargs


def critics_are_batched(state_dict: dict[str, Any], prefix: str = "critic.") -> bool | None:
    """
    The critic layout a policy's state dict was saved with: ``True`` for batched MLP critics, ``False`` for one
    module per Q-network, ``None`` when it holds no critic.
    """
    networks = prefix + "q_networks."
    keys = [key[len(networks) :] for key in state_dict if key.startswith(networks)]
    if not keys:
        return None
    return any(key.startswith("linears.") for key in keys)


def make_network(
    architecture: str,
    in_dim: int,
    out_dim: int,
    net_arch: list[int],
    activation_fn: type[nn.Module],
    squash_output: bool = False,
    layer_norm: bool = False,
) -> nn.Sequential:
    """
    The network of an actor or a Q-network after its features extractor.

    :param architecture: ``"mlp"``: ``net_arch`` lists the hidden layers; ``"simbav2"``: ``net_arch`` lists the
        LERP blocks, all of one width (``[256, 256]``: two blocks of width 256; ``activation_fn`` is not used)
    :param in_dim: input size
    :param out_dim: output size
    :param net_arch: hidden sizes
    :param activation_fn: activation after each hidden layer of an MLP
    :param squash_output: end with ``tanh``
    :param layer_norm: LayerNorm after each hidden layer of an MLP
    """
    if architecture == "simbav2":
        if not net_arch or len(set(net_arch)) != 1:
            raise ValueError(
                f"architecture='simbav2' needs net_arch to list blocks of one width, e.g. [256, 256], got {net_arch}"
            )
        return SimbaV2Network(in_dim, out_dim, net_arch[0], len(net_arch), squash_output)
    post_linear: list[type[nn.Module]] | None = [nn.LayerNorm] if layer_norm else None
    return nn.Sequential(
        *create_mlp(in_dim, out_dim, net_arch, activation_fn, squash_output=squash_output, post_linear_modules=post_linear)
    )


class FeaturesNetwork(BaseModel):
    """
    A network that reads observations as SB3's do: SB3's preprocessing (images divided by 255 when
    ``normalize_images``, discrete values one-hot encoded, see :func:`make_preprocessor`), then its features extractor.

    :param observation_space: the (sub)space of the observations this network reads
    :param action_space: the action space
    :param features_extractor: the features extractor (possibly shared with another network)
    :param normalize_images: divide images by 255
    """

    features_extractor: BaseFeaturesExtractor

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        features_extractor: BaseFeaturesExtractor,
        normalize_images: bool = True,
    ):
        super().__init__(
            observation_space, action_space, features_extractor=features_extractor, normalize_images=normalize_images
        )
        self._preprocess = make_preprocessor(observation_space, normalize_images)
        self._flatten_keys = _flatten_keys(features_extractor, observation_space, normalize_images)

    def features(self, obs: PyTorchObs) -> th.Tensor:
        """The features extractor's output for (normalized) observations, shape (batch, features_dim)."""
        keys = self._flatten_keys
        if keys is None:
            return self.features_extractor(self._preprocess(obs))
        if keys == ("",):
            return obs.flatten(start_dim=1).float()  # type: ignore[union-attr]
        return th.cat([obs[key].flatten(start_dim=1).float() for key in keys], dim=1)  # type: ignore[index]


class Actor(FeaturesNetwork, BasePolicy):
    """
    Deterministic actor: features extractor, then an MLP followed by ``tanh``, so actions lie in [-1, 1].
    ``forward`` reads normalized observations (the algorithm normalizes a batch once for the actor and the critic);
    ``predict`` reads raw ones (the env's whole observation) and applies ``obs_normalizer`` first, so a saved actor
    acts as its policy does.

    :param observation_space: the (sub)space of the observations the actor reads
    :param action_space: the action space
    :param features_extractor: the features extractor
    :param net_arch: hidden layer sizes
    :param activation_fn: activation after each hidden layer
    :param normalize_images: divide images by 255
    :param obs_normalizer: the policy's observation normalizer (the same module, not a copy), or None
    :param architecture: ``"mlp"`` or ``"simbav2"`` (see :func:`make_network`)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        features_extractor: BaseFeaturesExtractor,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        obs_normalizer: EmpiricalNormalization | DictNormalization | None = None,
        architecture: str = "mlp",
    ):
        super().__init__(observation_space, action_space, features_extractor, normalize_images)
        self._squash_output = True  # predict() maps actions from [-1, 1] to the action space's bounds
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.obs_normalizer = obs_normalizer
        self.architecture = architecture
        action_dim = spaces.flatdim(action_space)
        self.mu = make_network(architecture, features_extractor.features_dim, action_dim, net_arch, activation_fn, True)
        if architecture == "mlp":
            # Start close to the zero action: small last layer (FastTD3 uses N(0, 0.01) weights, zero bias)
            last_linear = self.mu[-2]
            assert isinstance(last_linear, nn.Linear)
            nn.init.normal_(last_linear.weight, 0.0, 0.01)
            nn.init.zeros_(last_linear.bias)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            features_extractor=self.features_extractor,
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            obs_normalizer=self.obs_normalizer,
            architecture=self.architecture,
        )
        return data

    def forward(self, obs: PyTorchObs) -> th.Tensor:
        return self.mu(self.features(obs))

    def obs_to_tensor(self, observation: np.ndarray | dict[str, np.ndarray]) -> tuple[PyTorchObs, bool]:
        # The env's whole observation is accepted: the actor keeps the keys it reads
        if isinstance(observation, dict) and isinstance(self.observation_space, spaces.Dict):
            observation = {key: observation[key] for key in self.observation_space.spaces}
        return super().obs_to_tensor(observation)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        if self.obs_normalizer is not None:
            observation = self.obs_normalizer(observation)  # type: ignore[arg-type]
        return self(observation)


class DistributionalCritic(FeaturesNetwork):
    """
    Twin distributional (C51) critic: each Q-network outputs logits over a fixed support of returns.

    With ``share_features_extractor``, the extractor is the actor's: as in SB3, the critic computes its features
    without gradient (the actor's loss trains the extractor) and its optimizer leaves the extractor out.

    :param observation_space: the (sub)space of the observations the critic reads
    :param action_space: the action space
    :param features_extractor: the features extractor (the actor's when shared)
    :param num_atoms: number of atoms of the support
    :param net_arch: hidden layer sizes of each Q-network
    :param activation_fn: activation after each hidden layer
    :param layer_norm: add a LayerNorm after each hidden Linear layer
    :param n_critics: number of Q-networks
    :param normalize_images: divide images by 255
    :param share_features_extractor: the features extractor is the actor's
    :param architecture: ``"mlp"`` or ``"simbav2"`` (see :func:`make_network`)
    :param batched: the Q-networks (``architecture="mlp"``) as one :class:`BatchedMLP`: one batched matrix product
        per layer for all of them instead of one per network (same function, another parameter layout)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        features_extractor: BaseFeaturesExtractor,
        num_atoms: int,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.ReLU,
        layer_norm: bool = False,
        n_critics: int = 2,
        normalize_images: bool = True,
        share_features_extractor: bool = False,
        architecture: str = "mlp",
        batched: bool = False,
    ):
        super().__init__(observation_space, action_space, features_extractor, normalize_images)
        self.share_features_extractor = share_features_extractor
        self.n_critics = n_critics  # as SB3's ContinuousCritic
        input_dim = features_extractor.features_dim + spaces.flatdim(action_space)
        self.q_networks: nn.ModuleList | BatchedMLP
        if batched:
            self.q_networks = BatchedMLP(n_critics, input_dim, num_atoms, net_arch, activation_fn, layer_norm)
        else:
            self.q_networks = nn.ModuleList(
                make_network(architecture, input_dim, num_atoms, net_arch, activation_fn, layer_norm=layer_norm)
                for _ in range(n_critics)
            )

    def forward(self, obs: PyTorchObs, actions: th.Tensor, n_critics: int | None = None) -> th.Tensor:
        """
        :param n_critics: evaluate the first ``n_critics`` Q-networks only (``None``: all)
        :return: logits of the Q-networks evaluated, shape (n_critics, batch, num_atoms)
        """
        if self.share_features_extractor:
            with th.no_grad():
                features = self.features(obs)
        else:
            features = self.features(obs)
        qf_input = th.cat([features, actions], dim=-1)
        if isinstance(self.q_networks, BatchedMLP):
            return self.q_networks(qf_input, n_critics)
        return th.stack([q_net(qf_input) for q_net in self.q_networks[:n_critics]])

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The parameters the critic's optimizer trains: all but a shared features extractor's."""
        if not self.share_features_extractor:
            return list(self.parameters())
        return [param for name, param in self.named_parameters() if not name.startswith("features_extractor.")]


class FastTD3Policy(BasePolicy):
    """
    Policy of FastTD3: observation normalizer, actor, distributional twin critic and its target.

    Observations go through: the empirical normalizer (:class:`EmpiricalNormalization`, vector parts only, kept in
    the policy so that a saved model normalizes by itself at ``predict`` time), the actor's or the critic's keys,
    SB3's preprocessing (images / 255, one-hot discrete values), the network's features extractor, its MLP.
    With a ``Dict`` observation space the actor reads ``actor_keys`` and the critic reads ``critic_keys``
    (asymmetric actor-critic). By default these are ``state`` / ``privileged_state`` (MuJoCo Playground) or
    ``policy`` / ``critic`` (Isaac Lab) when present, otherwise every key for both.

    :param observation_space: observation space (``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary`` or a
        ``Dict`` of those)
    :param action_space: bounded ``Box`` action space
    :param lr_schedule: learning rate schedule (the algorithm sets the actor's and critic's rates)
    :param net_arch: hidden sizes, ``dict(pi=[...], qf=[...])`` or one list for both
        (default ``[256, 256]`` for both, sized for a CPU)
    :param activation_fn: activation function
    :param features_extractor_class: features extractor of the actor and of the critic, built over the
        (sub)space each reads (``None``: ``CombinedExtractor`` for ``Dict`` spaces, ``FlattenExtractor`` otherwise)
    :param features_extractor_kwargs: keyword arguments of the features extractor
    :param normalize_images: divide images by 255
    :param share_features_extractor: one extractor for the actor and the critic, trained by the actor's loss
        (needs the same actor and critic keys)
    :param layer_norm: LayerNorm after each hidden layer of the critic (``architecture="mlp"``)
    :param batched_critics: evaluate the Q-networks (``architecture="mlp"``) together, one batched matrix product
        per layer (:class:`~sb3_fasttd3.common.batched_mlp.BatchedMLP`): the same function with fewer, larger
        operators; ``False``: one SB3 MLP per Q-network (``critic.q_networks[i]``); ``None``: batched with MLP
        critics whose ``activation_fn`` has no parameters (such as ``nn.PReLU``'s, which each network keeps its own of)
    :param architecture: the actor's and the critic's networks: ``"mlp"``, or ``"simbav2"`` (SimbaV2's
        hyperspherical residual blocks; ``net_arch`` then lists blocks of one width, and the default optimizer has
        no weight decay since the weights are kept on the unit sphere)
    :param actor_keys: observation keys the actor reads (``Dict`` spaces only)
    :param critic_keys: observation keys the critic reads (``Dict`` spaces only)
    :param num_atoms: atoms of the critic's support (set by the algorithm)
    :param v_min: smallest atom (set by the algorithm)
    :param v_max: largest atom (set by the algorithm)
    :param n_critics: number of Q-networks
    :param use_target_actor: keep a target actor (classic TD3) (set by the algorithm)
    :param average_actor: keep a moving average of the actor's weights, which ``predict`` acts with (set by the
        algorithm, which updates it)
    :param normalize_observations: normalize observations with running statistics (set by the algorithm)
    :param clip_obs: clip normalized observations to this absolute value (``None``: no clipping)
    :param epsilon: added to the variance before the square root (to the standard deviation with ``epsilon_on_std``)
    :param epsilon_on_std: normalize by ``std + epsilon`` instead of ``sqrt(var + epsilon)``
    :param optimizer_class: optimizer (AdamW by default)
    :param optimizer_kwargs: optimizer arguments (default: :func:`default_optimizer_kwargs`, ``weight_decay=0.1,
        fused=True`` for AdamW)
    """

    support: th.Tensor  # the critic's atoms (a buffer derived from v_min, v_max and num_atoms)
    # The features extractor when none is given (None: CombinedExtractor for Dict spaces, FlattenExtractor otherwise)
    default_features_extractor_class: type[BaseFeaturesExtractor] | None = None

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        share_features_extractor: bool = False,
        layer_norm: bool = False,
        batched_critics: bool | None = None,
        architecture: str = "mlp",
        actor_keys: list[str] | None = None,
        critic_keys: list[str] | None = None,
        num_atoms: int = 101,
        v_min: float = -250.0,
        v_max: float = 250.0,
        n_critics: int = 2,
        use_target_actor: bool = False,
        average_actor: bool = False,
        normalize_observations: bool = True,
        clip_obs: float | None = 10.0,
        epsilon: float = 1e-8,
        epsilon_on_std: bool = False,
        optimizer_class: type[th.optim.Optimizer] = th.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
        if architecture == "simbav2" and layer_norm:
            raise ValueError("layer_norm=True applies to architecture='mlp' only: SimbaV2 normalizes every block itself")
        if architecture == "simbav2" and batched_critics:
            raise ValueError("batched_critics=True applies to architecture='mlp' only, got architecture='simbav2'")
        # Batched critics apply one activation module to every network: one with parameters would tie them
        activation_has_parameters = any(True for _ in activation_fn().parameters())
        if batched_critics and activation_has_parameters:
            raise ValueError(
                f"batched_critics=True needs an activation_fn without parameters (its one module serves every critic), "
                f"got {activation_fn.__name__}: give batched_critics=False"
            )
        if not (is_integer(n_critics) and n_critics >= 1):
            raise ValueError(f"n_critics must be an integer >= 1, got {n_critics!r}")
        if isinstance(net_arch, dict) and not {"pi", "qf"} <= set(net_arch):
            raise ValueError(f"net_arch as a dict must have the keys 'pi' (actor) and 'qf' (critics), got {net_arch}")
        if optimizer_kwargs is None:
            optimizer_kwargs = default_optimizer_kwargs(optimizer_class, architecture)
        if features_extractor_class is None:
            features_extractor_class = self.default_features_extractor_class
        if features_extractor_class is None:
            features_extractor_class = CombinedExtractor if isinstance(observation_space, spaces.Dict) else FlattenExtractor
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,
            normalize_images=normalize_images,
        )
        if net_arch is None:
            # Sized for a CPU; FastTD3's GPU setting is dict(pi=[512, 256, 128], qf=[1024, 512, 256])
            net_arch = {"pi": [256, 256], "qf": [256, 256]}
        if isinstance(net_arch, list):
            net_arch = {"pi": net_arch, "qf": net_arch}
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.share_features_extractor = share_features_extractor
        self.layer_norm = layer_norm
        if batched_critics is None:
            batched_critics = architecture == "mlp" and not activation_has_parameters
        self.batched_critics = batched_critics
        self.architecture = architecture
        self.num_atoms = num_atoms
        self.v_min = v_min
        self.v_max = v_max
        self.n_critics = int(n_critics)
        self.use_target_actor = use_target_actor
        self.average_actor = average_actor
        self.normalize_observations = normalize_observations
        self.clip_obs = clip_obs
        self.epsilon = epsilon
        self.epsilon_on_std = epsilon_on_std
        self.actor_keys, self.critic_keys = self._select_keys(observation_space, actor_keys, critic_keys)
        if share_features_extractor and set(self.actor_keys or []) != set(self.critic_keys or []):
            raise ValueError(
                "share_features_extractor=True needs the actor and the critic to read the same observation keys, got "
                f"actor_keys={self.actor_keys} and critic_keys={self.critic_keys}: use share_features_extractor=False "
                "(the default) or give both the same keys"
            )
        self._build(lr_schedule)

    @staticmethod
    def _select_keys(
        observation_space: spaces.Space, actor_keys: list[str] | None, critic_keys: list[str] | None
    ) -> tuple[list[str] | None, list[str] | None]:
        if not isinstance(observation_space, spaces.Dict):
            if actor_keys is not None or critic_keys is not None:
                raise ValueError("actor_keys and critic_keys are only accepted with a Dict observation space")
            return None, None
        available = list(observation_space.spaces.keys())
        if actor_keys is None and critic_keys is None:
            for default_actor, default_critic in ASYMMETRIC_KEYS:
                if set(default_actor + default_critic) <= set(available):
                    return default_actor, default_critic
        actor_keys = available if actor_keys is None else list(actor_keys)
        critic_keys = available if critic_keys is None else list(critic_keys)
        for name, keys in (("actor_keys", actor_keys), ("critic_keys", critic_keys)):
            unknown = [key for key in keys if key not in available]
            if unknown or not keys:
                raise ValueError(f"{name} must be a non-empty list of observation keys among {available}, got {keys}")
        return actor_keys, critic_keys

    def _subspace(self, keys: list[str] | None) -> spaces.Space:
        """The observation space of ``keys`` in their order (the whole space for ``None``)."""
        if keys is None:
            return self.observation_space
        assert isinstance(self.observation_space, spaces.Dict)
        return spaces.Dict(OrderedDict((key, self.observation_space[key]) for key in keys))

    def _make_features_extractor(self, observation_space: spaces.Space) -> BaseFeaturesExtractor:
        return self.features_extractor_class(observation_space, **self.features_extractor_kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        self.obs_normalizer: EmpiricalNormalization | DictNormalization | None = None
        if self.normalize_observations:
            self.obs_normalizer = make_normalizer(
                self.observation_space, epsilon=self.epsilon, clip_obs=self.clip_obs, epsilon_on_std=self.epsilon_on_std
            )

        actor_space, critic_space = self._subspace(self.actor_keys), self._subspace(self.critic_keys)
        action_space = self.action_space
        assert isinstance(action_space, spaces.Box)
        self.actor = Actor(
            actor_space,
            action_space,
            self._make_features_extractor(actor_space),
            self.net_arch["pi"],
            self.activation_fn,
            self.normalize_images,
            self.obs_normalizer,
            self.architecture,
        )
        share = self.share_features_extractor
        self.critic = DistributionalCritic(
            critic_space,
            action_space,
            self.actor.features_extractor if share else self._make_features_extractor(critic_space),
            self.num_atoms,
            self.net_arch["qf"],
            self.activation_fn,
            self.layer_norm,
            self.n_critics,
            self.normalize_images,
            share,
            self.architecture,
            self.batched_critics,
        )
        # Targets hold their own copies and stay in eval mode
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False).train(False)
        self.actor_target = None
        if self.use_target_actor:
            self.actor_target = copy.deepcopy(self.actor).requires_grad_(False).train(False)
            self.actor_target.obs_normalizer = self.obs_normalizer  # one set of statistics
            if share:  # as the online networks, the targets share one extractor (the critic target's)
                self.actor_target.features_extractor = self.critic_target.features_extractor
        # What predict() acts with where kept: the actor averaged over its recent steps, extractor included
        self.actor_average = None
        if self.average_actor:
            self.actor_average = copy.deepcopy(self.actor).requires_grad_(False).train(False)
            self.actor_average.obs_normalizer = self.obs_normalizer
        self.register_load_state_dict_pre_hook(_match_actor_average)  # first: it reads what the actor's keys hold
        self.register_load_state_dict_pre_hook(_copy_normalizer_statistics)
        # Derived from (v_min, v_max, num_atoms): moves with the policy but is not saved
        self.register_buffer("support", make_support(self.v_min, self.v_max, self.num_atoms), persistent=False)

        lr = lr_schedule(1)
        make_optimizer = self.optimizer_class
        self.actor.optimizer = make_optimizer(self.actor.parameters(), lr=lr, **self.optimizer_kwargs)  # type: ignore[call-arg]
        critic_parameters = self.critic.optimizer_parameters()
        self.critic.optimizer = make_optimizer(critic_parameters, lr=lr, **self.optimizer_kwargs)  # type: ignore[call-arg]
        self.set_training_mode(False)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            features_extractor_class=self.features_extractor_class,
            features_extractor_kwargs=self.features_extractor_kwargs,
            share_features_extractor=self.share_features_extractor,
            layer_norm=self.layer_norm,
            batched_critics=self.batched_critics,
            architecture=self.architecture,
            actor_keys=self.actor_keys,
            critic_keys=self.critic_keys,
            num_atoms=self.num_atoms,
            v_min=self.v_min,
            v_max=self.v_max,
            n_critics=self.n_critics,
            use_target_actor=self.use_target_actor,
            average_actor=self.average_actor,
            normalize_observations=self.normalize_observations,
            clip_obs=self.clip_obs,
            epsilon=self.epsilon,
            epsilon_on_std=self.epsilon_on_std,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            lr_schedule=self._dummy_schedule,
        )
        return data

    @classmethod
    def load(cls, path: str, device: th.device | str = "auto") -> "FastTD3Policy":  # type: ignore[override]
        """SB3's ``BasePolicy.load``, with the critic layout the policy was saved with (see :func:`critics_are_batched`)."""
        saved = th.load(path, map_location=get_device(device), weights_only=False)
        saved_batched = critics_are_batched(saved["state_dict"])
        if saved_batched is not None:
            saved["data"]["batched_critics"] = saved_batched
        model = cls(**saved["data"])
        model.load_state_dict(saved["state_dict"])
        return model.to(get_device(device))

    def update_normalizer(self, obs: PyTorchObs, merge_moments: MergeMoments | None = None) -> None:
        """
        Merge collected (raw) observations into the normalizer's statistics (vector parts only).

        :param obs: the observations
        :param merge_moments: see :meth:`EmpiricalNormalization.update`
        """
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(obs, merge_moments)  # type: ignore[arg-type]

    def _inputs(self, obs: PyTorchObs, keys: list[str] | None) -> PyTorchObs:
        if keys is not None:
            obs = {key: obs[key] for key in keys}  # type: ignore[index]
        return obs if self.obs_normalizer is None else self.obs_normalizer(obs)  # type: ignore[arg-type]

    def actor_input(self, obs: PyTorchObs) -> PyTorchObs:
        """What the actor reads: the normalized observation, or the dict of its normalized keys."""
        return self._inputs(obs, self.actor_keys)

    def critic_input(self, obs: PyTorchObs) -> PyTorchObs:
        """What the critic reads: the normalized observation, or the dict of its normalized keys."""
        return self._inputs(obs, self.critic_keys)

    def q_values(
        self, critic: DistributionalCritic, critic_obs: PyTorchObs, actions: th.Tensor, n_critics: int | None = None
    ) -> th.Tensor:
        """Expected value of the distribution of each Q-network (the first ``n_critics``), shape (n_critics, batch)."""
        return expected_value(critic(critic_obs, actions, n_critics), self.support)

    def forward(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(observation, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        # Exploration noise is added by the algorithm to the live actor's actions: acting is deterministic here
        actor = self.actor if self.actor_average is None else self.actor_average
        return actor(self.actor_input(observation))

    def live_actions(self, observation: PyTorchObs) -> th.Tensor:
        """The live actor's actions in [-1, 1], which explore: ``predict`` acts with the average where one is kept."""
        return self.actor(self.actor_input(observation))

    def set_training_mode(self, mode: bool) -> None:
        """Train or eval mode of the actor and the critic, their features extractors included (targets stay in eval)."""
        self.actor.set_training_mode(mode)
        self.critic.set_training_mode(mode)
        self.training = mode


class MlpPolicy(FastTD3Policy):
    """FastTD3 policy for vector observations (``FlattenExtractor``)."""


class CnnPolicy(FastTD3Policy):
    """FastTD3 policy for image observations (``NatureCNN`` by default, see :class:`FastTD3Policy`)."""

    default_features_extractor_class = NatureCNN


class MultiInputPolicy(FastTD3Policy):
    """
    FastTD3 policy for ``Dict`` observations (``CombinedExtractor`` by default; asymmetric actor-critic through
    ``actor_keys``/``critic_keys``, see :class:`FastTD3Policy`).
    """

    default_features_extractor_class = CombinedExtractor
