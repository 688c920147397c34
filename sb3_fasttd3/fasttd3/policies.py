"""Actor, distributional twin critic and the policy that holds them with the observation normalizer."""

import copy
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_fasttd3.common.distributional import expected_value, make_support
from sb3_fasttd3.common.normalization import DictNormalization, EmpiricalNormalization

# Observation keys of the asymmetric actor-critic setups we know: (actor keys, critic keys)
ASYMMETRIC_KEYS = (
    (["state"], ["privileged_state"]),  # MuJoCo Playground
    (["policy"], ["critic"]),  # Isaac Lab observation groups
)


class Actor(nn.Module):
    """
    Deterministic actor: an MLP followed by ``tanh``, so actions lie in [-1, 1].

    :param input_dim: size of the (flattened, normalized) observation
    :param action_dim: size of the action
    :param net_arch: hidden layer sizes
    :param activation_fn: activation after each hidden layer
    """

    def __init__(self, input_dim: int, action_dim: int, net_arch: list[int], activation_fn: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.mu = nn.Sequential(*create_mlp(input_dim, action_dim, net_arch, activation_fn, squash_output=True))
        # Start close to the zero action: small last layer (FastTD3 uses N(0, 0.01) weights, zero bias)
        last_linear = self.mu[-2]
        nn.init.normal_(last_linear.weight, 0.0, 0.01)
        nn.init.zeros_(last_linear.bias)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        return self.mu(obs)


class DistributionalCritic(nn.Module):
    """
    Twin distributional (C51) critic: each Q-network outputs logits over a fixed support of returns.

    :param input_dim: size of the (flattened, normalized) critic observation
    :param action_dim: size of the action
    :param num_atoms: number of atoms of the support
    :param net_arch: hidden layer sizes of each Q-network
    :param activation_fn: activation after each hidden layer
    :param layer_norm: add a LayerNorm after each hidden Linear layer
    :param n_critics: number of Q-networks
    """

    def __init__(
        self,
        input_dim: int,
        action_dim: int,
        num_atoms: int,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.ReLU,
        layer_norm: bool = False,
        n_critics: int = 2,
    ):
        super().__init__()
        post_linear = [nn.LayerNorm] if layer_norm else None
        self.q_networks = nn.ModuleList(
            nn.Sequential(
                *create_mlp(input_dim + action_dim, num_atoms, net_arch, activation_fn, post_linear_modules=post_linear)
            )
            for _ in range(n_critics)
        )

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """
        :return: logits of every Q-network, shape (n_critics, batch, num_atoms)
        """
        qf_input = th.cat([obs, actions], dim=-1)
        return th.stack([q_net(qf_input) for q_net in self.q_networks])


class FastTD3Policy(BasePolicy):
    """
    Policy of FastTD3: observation normalizer, actor, distributional twin critic and its target.

    Observations are normalized inside the policy (:class:`EmpiricalNormalization`), so a saved model
    normalizes by itself at ``predict`` time. With a ``Dict`` observation space the actor reads
    ``actor_keys`` and the critic reads ``critic_keys`` (asymmetric actor-critic). By default these are
    ``state`` / ``privileged_state`` (MuJoCo Playground) or ``policy`` / ``critic`` (Isaac Lab) when
    present, otherwise every key for both.

    :param observation_space: observation space (``Box`` or ``Dict`` of ``Box``)
    :param action_space: bounded ``Box`` action space
    :param lr_schedule: learning rate schedule (the algorithm sets the actor's and critic's rates)
    :param net_arch: hidden sizes, ``dict(pi=[...], qf=[...])`` or one list for both
        (default ``[256, 256]`` for both, sized for a CPU)
    :param activation_fn: activation function
    :param layer_norm: LayerNorm after each hidden layer of the critic
    :param actor_keys: observation keys the actor reads (``Dict`` spaces only)
    :param critic_keys: observation keys the critic reads (``Dict`` spaces only)
    :param num_atoms: atoms of the critic's support (set by the algorithm)
    :param v_min: smallest atom (set by the algorithm)
    :param v_max: largest atom (set by the algorithm)
    :param n_critics: number of Q-networks
    :param use_target_actor: keep a target actor (classic TD3) (set by the algorithm)
    :param normalize_observations: normalize observations with running statistics (set by the algorithm)
    :param clip_obs: clip normalized observations to this absolute value
    :param epsilon: added to the variance before the square root
    :param optimizer_class: optimizer (AdamW by default)
    :param optimizer_kwargs: optimizer arguments (default ``weight_decay=0.1, fused=True``)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        layer_norm: bool = False,
        actor_keys: list[str] | None = None,
        critic_keys: list[str] | None = None,
        num_atoms: int = 101,
        v_min: float = -250.0,
        v_max: float = 250.0,
        n_critics: int = 2,
        use_target_actor: bool = False,
        normalize_observations: bool = True,
        clip_obs: float = 10.0,
        epsilon: float = 1e-8,
        optimizer_class: type[th.optim.Optimizer] = th.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        if optimizer_kwargs is None:
            # Fused AdamW: one kernel for all parameters (about 5x faster than the default on a CPU)
            optimizer_kwargs = {"weight_decay": 0.1, "fused": True}
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,
            normalize_images=False,
        )
        if net_arch is None:
            # Sized for a CPU; FastTD3's GPU setting is dict(pi=[512, 256, 128], qf=[1024, 512, 256])
            net_arch = {"pi": [256, 256], "qf": [256, 256]}
        if isinstance(net_arch, list):
            net_arch = {"pi": net_arch, "qf": net_arch}
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.layer_norm = layer_norm
        self.num_atoms = num_atoms
        self.v_min = v_min
        self.v_max = v_max
        self.n_critics = n_critics
        self.use_target_actor = use_target_actor
        self.normalize_observations = normalize_observations
        self.clip_obs = clip_obs
        self.epsilon = epsilon
        self.actor_keys, self.critic_keys = self._select_keys(observation_space, actor_keys, critic_keys)
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

    def _input_dim(self, keys: list[str] | None) -> int:
        if keys is None:
            return spaces.flatdim(self.observation_space)
        return sum(spaces.flatdim(self.observation_space[key]) for key in keys)

    def _build(self, lr_schedule: Schedule) -> None:
        self.obs_normalizer: EmpiricalNormalization | DictNormalization | None = None
        if self.normalize_observations:
            if isinstance(self.observation_space, spaces.Dict):
                self.obs_normalizer = DictNormalization(self.observation_space, self.epsilon, self.clip_obs)
            else:
                self.obs_normalizer = EmpiricalNormalization(self.observation_space.shape, self.epsilon, self.clip_obs)

        action_dim = spaces.flatdim(self.action_space)
        self.actor = Actor(self._input_dim(self.actor_keys), action_dim, self.net_arch["pi"], self.activation_fn)
        self.critic = DistributionalCritic(
            self._input_dim(self.critic_keys),
            action_dim,
            self.num_atoms,
            self.net_arch["qf"],
            self.activation_fn,
            self.layer_norm,
            self.n_critics,
        )
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False) if self.use_target_actor else None
        # Derived from (v_min, v_max, num_atoms): moves with the policy but is not saved
        self.register_buffer("support", make_support(self.v_min, self.v_max, self.num_atoms), persistent=False)

        self.actor.optimizer = self.optimizer_class(self.actor.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        self.critic.optimizer = self.optimizer_class(self.critic.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        self.set_training_mode(False)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            layer_norm=self.layer_norm,
            actor_keys=self.actor_keys,
            critic_keys=self.critic_keys,
            num_atoms=self.num_atoms,
            v_min=self.v_min,
            v_max=self.v_max,
            n_critics=self.n_critics,
            use_target_actor=self.use_target_actor,
            normalize_observations=self.normalize_observations,
            clip_obs=self.clip_obs,
            epsilon=self.epsilon,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            lr_schedule=self._dummy_schedule,
        )
        return data

    def update_normalizer(self, obs: PyTorchObs) -> None:
        """Merge collected (raw) observations into the normalizer's statistics."""
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(obs)  # type: ignore[arg-type]

    def _inputs(self, obs: PyTorchObs, keys: list[str] | None) -> th.Tensor:
        obs = self.obs_normalizer(obs) if self.obs_normalizer is not None else obs
        if keys is None:
            return obs.flatten(start_dim=1).float()  # type: ignore[union-attr]
        return th.cat([obs[key].flatten(start_dim=1).float() for key in keys], dim=1)  # type: ignore[index]

    def actor_input(self, obs: PyTorchObs) -> th.Tensor:
        """Normalized, flattened observation the actor reads."""
        return self._inputs(obs, self.actor_keys)

    def critic_input(self, obs: PyTorchObs) -> th.Tensor:
        """Normalized, flattened observation the critic reads."""
        return self._inputs(obs, self.critic_keys)

    def q_values(self, critic: DistributionalCritic, critic_obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Expected value of each Q-network's distribution, shape (n_critics, batch)."""
        return expected_value(critic(critic_obs, actions), self.support)

    def forward(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(observation, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        # Exploration noise is added by the algorithm during rollouts: acting is deterministic here
        return self.actor(self.actor_input(observation))

    def set_training_mode(self, mode: bool) -> None:
        self.actor.train(mode)
        self.critic.train(mode)
        self.training = mode


class MlpPolicy(FastTD3Policy):
    """FastTD3 policy for ``Box`` observations."""


class MultiInputPolicy(FastTD3Policy):
    """FastTD3 policy for ``Dict`` observations (asymmetric actor-critic through ``actor_keys``/``critic_keys``)."""
