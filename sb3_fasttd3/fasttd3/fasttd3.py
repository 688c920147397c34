"""FastTD3: TD3 with parallel environments, large batches and a distributional twin critic."""

import io
import pathlib
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium.vector import VectorEnv
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import ActionNoise, VectorizedActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule, TrainFreq
from stable_baselines3.common.utils import FloatSchedule, get_parameters_by_name, update_learning_rate
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from torch.nn import functional as F

from sb3_fasttd3.common import sb3_buffers
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.callbacks import TimestepsProgressBar
from sb3_fasttd3.common.distributed import DataParallel, local_rank
from sb3_fasttd3.common.distributional import categorical_projection
from sb3_fasttd3.common.noise import MixedGaussianNoise
from sb3_fasttd3.common.simbav2 import hyperspherical_weights, project_weights_
from sb3_fasttd3.common.update_statistics import UpdateStatistics
from sb3_fasttd3.fasttd3.checkpointing import Checkpointing
from sb3_fasttd3.fasttd3.checks import (
    check_device,
    check_env_spaces,
    check_finite_reset,
    has_native_bf16,
    resolve_normalize_observations,
)
from sb3_fasttd3.fasttd3.hyperparameter_checks import (
    AMP_DTYPES,
    INTEGER_HYPERPARAMETERS,
    check_action_noise,
    check_hyperparameters,
)
from sb3_fasttd3.fasttd3.policies import (
    Actor,
    CnnPolicy,
    DistributionalCritic,
    FastTD3Policy,
    MlpPolicy,
    MultiInputPolicy,
    critics_are_batched,
)
from sb3_fasttd3.fasttd3.ranks import check_ranks
from sb3_fasttd3.fasttd3.rollouts import RolloutCollection
from sb3_fasttd3.vec_env.gymnasium_vector import GymnasiumVecEnv

SelfFastTD3 = TypeVar("SelfFastTD3", bound="FastTD3")


# Largest number of transitions gathered at once when the updates of a train() call share one gather
MAX_SAMPLES_PER_GATHER = 2**20


def _split_batches(value: Any, batch_size: int, n_batches: int) -> list[Any]:
    """Split one field of a sample of ``batch_size * n_batches`` transitions into ``n_batches`` views."""
    if value is None:
        return [None] * n_batches
    if isinstance(value, dict):
        parts = {key: _split_batches(part, batch_size, n_batches) for key, part in value.items()}
        return [{key: parts[key][i] for key in value} for i in range(n_batches)]
    return list(value.split(batch_size))


def _compile_for_this_model(method: Callable, mode: str | None) -> Callable:
    """
    ``torch.compile`` of a bound method, through a copy of its code object. Dynamo keeps compiled graphs, and
    counts recompilations, per code object: models built one after another in a process (seeds, Optuna trials,
    tests) would otherwise share one cache, each adding a recompilation, and from the ninth on silently run eager.

    :param method: a method bound to this model
    :param mode: ``torch.compile``'s mode
    :return: the compiled method
    """
    func = method.__func__  # type: ignore[attr-defined]
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    return th.compile(types.MethodType(own, method.__self__), mode=mode)  # type: ignore[attr-defined]


class FastTD3(RolloutCollection, Checkpointing):
    """
    FastTD3: TD3 scaled by parallel simulation, large batches and a distributional (C51) twin critic.

    Paper: https://arxiv.org/abs/2505.22642 (Seo et al., 2025).
    Differences with TD3: a categorical critic trained with cross-entropy towards the projected
    (n-step) target distribution, clipped double Q chosen per sample on the projected distributions'
    means, no target actor by default, per-environment exploration noise scales (mixed noise),
    observation normalization inside the policy, AdamW, and updates after every vector step.

    The arguments FastTD3 shares with SB3's TD3 come first, in TD3's order; FastTD3's own are keyword-only.

    Counting follows SB3: ``total_timesteps``, ``learning_starts`` and ``buffer_size`` count transitions
    over all environments (one vector step adds ``n_envs`` transitions). The reference implementation
    counts vector steps and a per-env buffer: multiply its values by ``n_envs``.

    Defaults follow the reference, except the batch size and the network sizes, which are sized for a CPU
    (``batch_size=256``, actor and critic ``256-256``); the reference's GPU settings are ``batch_size=32768``,
    actor ``512-256-128`` and critic ``1024-512-256`` (see docs/guide/hyperparameters.md). Tuned per-task values
    for a CPU are in ``hyperparams/fasttd3.yml``.

    :param policy: the policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy)
    :param env: the environment to learn from (a VecEnv with many envs is where FastTD3 shines)
    :param learning_rate: learning rate of both actor and critic unless overridden (float or schedule)
    :param buffer_size: size of the replay buffer in transitions, over all envs
    :param learning_starts: how many transitions to collect before learning starts (with ``warmup_actions``)
    :param batch_size: minibatch size of each gradient update
    :param tau: soft update coefficient of the target critic, applied after every critic update
    :param gamma: the discount factor
    :param train_freq: update the model every ``train_freq`` vector steps (or ``(n, "episode")`` with one env)
    :param gradient_steps: critic updates after each rollout (FastTD3's ``num_updates``); ``-1``: as many as
        transitions collected in the rollout
    :param action_noise: an SB3 ``ActionNoise`` (e.g. ``NormalActionNoise``) added to the actor's actions in the
        [-1, 1] scale and reset for an env when its episode ends, as in SB3's TD3; it replaces the mixed per-env
        noise (``std_min``/``std_max``), which ``None`` keeps
    :param replay_buffer_class: replay buffer class (``None``: :class:`DeviceNStepReplayBuffer`); SB3's
        ``ReplayBuffer``, ``DictReplayBuffer``, ``NStepReplayBuffer`` and ``HerReplayBuffer`` work too, on the host
        (``HerReplayBuffer`` and the other one-step buffers with ``n_steps=1``)
    :param replay_buffer_kwargs: keyword arguments passed to the replay buffer on creation
    :param optimize_memory_usage: store the next observation only where an episode ends (or an n-step window
        needs it) instead of once per transition: about half the memory for a sample that costs a second gather
        (benchmarks/results/replay_memory.md)
    :param n_steps: length of the n-step returns
    :param policy_delay: the actor (and target actor) is updated once every ``policy_delay`` critic updates,
        counted over the whole training
    :param target_policy_noise: standard deviation of the target policy smoothing noise
    :param target_noise_clip: limit for the absolute value of the target policy smoothing noise
    :param stats_window_size: window size for the rollout logging
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments for the policy (``net_arch``, ``layer_norm``, ``actor_keys``,
        ``critic_keys``, ``batched_critics``, ``optimizer_kwargs`` such as ``weight_decay``...)
    :param verbose: verbosity level: 0 for no output, 1 for info messages, 2 for debug messages
    :param seed: seed for the pseudo random generators
    :param device: device on which the code should run (``"auto"``: CUDA when available)
    :param actor_learning_rate: learning rate of the actor (float or schedule); ``None``: ``learning_rate``
    :param critic_learning_rate: learning rate of the critic (float or schedule); ``None``: ``learning_rate``
    :param std_min: smallest exploration noise scale (mixed noise: one scale per env in [std_min, std_max])
    :param std_max: largest exploration noise scale
    :param noise_correlation: environment steps over which the mixed noise's correlation decays to 1/e (an
        Ornstein-Uhlenbeck-like process of the same per-env scale, for longer excursions); ``None``: white noise,
        drawn anew at every step, as the reference. Shapes the mixed noise only, so not with ``action_noise``
    :param stratified_noise: env ``i`` draws its noise scale from the ``i``-th of ``n_envs`` equal slices of
        [std_min, std_max], so that every step mixes small and large scales however few envs there are; ``False``:
        each env draws from the whole range, as the reference. Shapes the mixed noise only, so not with ``action_noise``
    :param n_step_start: transitions collected before ``num_timesteps`` reaches it (counting them) keep one-step
        returns, later ones ``n_steps``-step returns: the long returns of the first, noisiest data are biased
        towards what the exploring policy does (on Hopper, they pull the learner into standing still); ``0``:
        ``n_steps``-step returns from the start
    :param n_step_max_noise: transitions acted with a mixed-noise scale above it (their env's, at that step) keep
        one-step returns, as do uniform warm-up actions: a long return is only as good as the actions it follows,
        and the noisiest envs' are the furthest from the policy's; ``None``: every transition gets ``n_steps``-step
        returns. Reads the mixed noise's scales, so not with ``action_noise``
    :param use_cdq: clipped double Q: train both critics towards the target distribution with the smaller mean,
        and train the actor on the smaller Q; otherwise each critic has its own target and the actor uses the mean
    :param actor_q: which critics the actor's loss reads: ``"all"`` (the smaller Q with ``use_cdq``, else the
        mean, as the FastTD3 reference) or ``"q1"`` (the first critic only, as SB3's TD3 and the TD3 paper), which
        skips the other critics' forward and backward passes in the actor step
    :param num_atoms: number of atoms of the critic's support
    :param v_min: smallest value of the critic's support
    :param v_max: largest value of the critic's support
    :param use_target_actor: compute the next action with a soft-updated target actor (classic TD3);
        FastTD3 uses the online actor
    :param actor_average_tau: keep a moving average of the actor, which ``predict()`` (evaluation, deployment) acts
        with: after every actor step it moves this fraction of the way to the actor's weights, so that it averages
        about the last ``1 / actor_average_tau`` steps and rides out the live actor's short lapses, at the cost of
        lagging it by as many. The live actor still explores and learns. ``None``: ``predict()`` acts with the live
        actor
    :param normalize_observations: normalize observations with running mean and variance kept in the policy;
        ``"auto"``: unless a ``VecNormalize`` wrapping the env normalizes them (both at once is refused)
    :param clip_obs: normalized observations are clipped to ``[-clip_obs, clip_obs]``; ``None``: no clipping
    :param epsilon: added to the variance before the square root when normalizing (to the standard deviation with
        ``epsilon_on_std``)
    :param epsilon_on_std: normalize by ``std + epsilon`` instead of ``sqrt(var + epsilon)``: the FastTD3 reference
        normalizes with ``epsilon_on_std=True, epsilon=0.01, clip_obs=None``, which scales a feature that has barely
        moved so far by at most 100 instead of blowing it up to the clip
    :param warmup_actions: how to act before ``learning_starts``: ``"uniform"`` (uniform random actions, as SB3)
        or ``"actor"`` (the initial actor, near zero, with the exploration noise, as the FastTD3 reference)
    :param max_grad_norm: clip the gradient norm of each update to this value (``None``: no clipping)
    :param compile: compile the loss computations and acting with ``torch.compile`` (CPU: inductor's default
        mode, the actor's loss staying eager, which is faster there; CUDA: ``reduce-overhead``, i.e. CUDA graphs)
    :param amp_dtype: mixed precision for the network forward passes: ``None`` (fp32), ``"bf16"`` (CPU and CUDA),
        ``"fp16"`` (CUDA only, with a gradient scaler), or ``"auto"``: bf16 where the device multiplies it natively
        (CUDA from compute capability 8.0, CPUs with AVX512-BF16 or AMX), fp32 elsewhere, decided again on
        each machine that loads the model (the dtype in use is ``autocast_dtype``). Softmax, the projection and
        the losses stay fp32.
    :param distributed: data-parallel training over ``torch.distributed`` (see docs/guide/distributed.md): each
        process (rank) steps its own envs into its own replay buffer, on ``cuda:LOCAL_RANK`` with a CUDA device, and
        the ranks average their gradients every update. ``"auto"``: when a process group of several ranks is
        initialized, or when torchrun started the process (a group is then initialized: NCCL for CUDA, gloo for the
        CPU); ``True``: the same, but a single process is an error; ``False``: never. Counts
        (``total_timesteps``, ``learning_starts``, ``buffer_size``...) are over all ranks except ``buffer_size``,
        which is per rank; only rank 0 runs callbacks, logs and saves. Not saved with the model.
    :param _init_setup_model: whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: FastTD3Policy
    replay_buffer: DeviceNStepReplayBuffer  # type: ignore[assignment]
    actor: Actor
    critic: DistributionalCritic
    critic_target: DistributionalCritic
    actor_target: Actor | None

    def __init__(
        self,
        policy: str | type[FastTD3Policy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 256,
        tau: float = 0.1,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 2,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[DeviceNStepReplayBuffer] | type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        policy_delay: int = 2,
        target_policy_noise: float = 0.001,
        target_noise_clip: float = 0.5,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        *,
        actor_learning_rate: float | Schedule | None = None,
        critic_learning_rate: float | Schedule | None = None,
        std_min: float = 0.001,
        std_max: float = 0.4,
        noise_correlation: float | None = None,
        stratified_noise: bool = False,
        n_step_start: int = 0,
        n_step_max_noise: float | None = None,
        use_cdq: bool = True,
        actor_q: str = "all",
        num_atoms: int = 101,
        v_min: float = -250.0,
        v_max: float = 250.0,
        use_target_actor: bool = False,
        actor_average_tau: float | None = None,
        normalize_observations: bool | str = "auto",
        clip_obs: float | None = 10.0,
        epsilon: float = 1e-8,
        epsilon_on_std: bool = False,
        warmup_actions: str = "uniform",
        max_grad_norm: float | None = None,
        compile: bool = False,
        amp_dtype: str | None = None,
        distributed: bool | str = "auto",
        _init_setup_model: bool = True,
    ):
        # Before SB3's own (assert-based) checks, so the user gets our explicit message
        check_env_spaces(env)
        check_device(device)
        super().__init__(
            policy,
            env,
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise=action_noise,
            replay_buffer_class=replay_buffer_class,  # type: ignore[arg-type]
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            support_multi_env=True,
        )
        self.actor_learning_rate = actor_learning_rate
        self.critic_learning_rate = critic_learning_rate
        self.policy_delay = policy_delay
        self.target_policy_noise = target_policy_noise
        self.target_noise_clip = target_noise_clip
        self.std_min = std_min
        self.std_max = std_max
        self.noise_correlation = noise_correlation
        self.stratified_noise = stratified_noise
        self.n_step_start = n_step_start
        self.n_step_max_noise = n_step_max_noise
        self.use_cdq = use_cdq
        self.actor_q = actor_q
        self.num_atoms = num_atoms
        self.v_min = v_min
        self.v_max = v_max
        self.use_target_actor = use_target_actor
        self.actor_average_tau = actor_average_tau
        self.normalize_observations = normalize_observations
        self.clip_obs = clip_obs
        self.epsilon = epsilon
        self.epsilon_on_std = epsilon_on_std
        self.warmup_actions = warmup_actions
        self.max_grad_norm = max_grad_norm
        self.compile = compile
        self.amp_dtype = amp_dtype
        self.distributed = distributed
        # Per-run state, rebuilt by _setup_learn (never saved)
        self.exploration_noise: MixedGaussianNoise | None = None
        self._last_obs_tensor: th.Tensor | dict[str, th.Tensor] | None = None
        self._acted_uniformly = False

        if self.env is not None:  # an env given by its id was made by SB3: check what it made
            check_env_spaces(self.env)
        # SB3's load() builds the model without setting it up, restores its data, then sets it up
        self._loading = not _init_setup_model
        if _init_setup_model:
            self._setup_model()

    def _check_one_step_returns(self) -> None:
        """``n_step_start`` and ``n_step_max_noise`` need a replay buffer that keeps one-step returns on demand."""
        for name, off in (("n_step_start", 0), ("n_step_max_noise", None)):
            if getattr(self, name) != off and not hasattr(self.replay_buffer, "one_step_returns"):
                raise ValueError(
                    f"{name} needs a replay buffer that keeps one-step returns on demand (a DeviceNStepReplayBuffer), "
                    f"which replay_buffer_class={type(self.replay_buffer).__name__} is not: give {name}={off}"
                )

    # ------------------------------------------------------------------ setup
    def _setup_model(self) -> None:
        # Here rather than in __init__: a loaded model knows normalize_observations only once its data is restored
        self.normalize_observations = resolve_normalize_observations(self.env, self.normalize_observations)
        self._setup_data_parallel()
        check_hyperparameters(self)
        for name in INTEGER_HYPERPARAMETERS:  # NumPy integers too, which torch's shape arguments refuse
            setattr(self, name, int(getattr(self, name)))
        if not isinstance(self.train_freq, TrainFreq):  # SB3's conversion refuses NumPy integers
            frequency, *unit = self.train_freq if isinstance(self.train_freq, tuple) else (self.train_freq,)
            self.train_freq = (int(frequency), *unit) if unit else int(frequency)  # type: ignore[assignment]
        self._setup_lr_schedule()
        self.actor_lr_schedule = FloatSchedule(
            self.learning_rate if self.actor_learning_rate is None else self.actor_learning_rate
        )
        self.critic_lr_schedule = FloatSchedule(
            self.learning_rate if self.critic_learning_rate is None else self.critic_learning_rate
        )
        self.set_random_seed(self.seed)

        if self.replay_buffer_class is None:
            self.replay_buffer_class = DeviceNStepReplayBuffer  # type: ignore[assignment]
        # Storage is allocated on the first add: loading a model to predict allocates nothing
        self.replay_buffer = self.replay_buffer_class(  # type: ignore[misc, call-arg, assignment]
            self.buffer_size,
            self.observation_space,
            self.action_space,
            device=self.device,
            n_envs=self.n_envs,
            optimize_memory_usage=self.optimize_memory_usage,
            **sb3_buffers.buffer_arguments(self.replay_buffer_class, self.n_steps, self.gamma, self.env),
            **self.replay_buffer_kwargs,
        )
        self._check_one_step_returns()
        self._make_policy()
        self._convert_train_freq()

    def _make_policy(self) -> None:
        """Build the policy from ``policy_kwargs`` and the algorithm's settings, then what depends on it."""
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space,
            self.action_space,
            self.critic_lr_schedule,
            **self.policy_kwargs,
            **self._algorithm_policy_kwargs(),
        ).to(self.device)
        self._create_aliases()
        self._setup_fast_path()

    def _setup_data_parallel(self) -> None:
        """Join the process group ``distributed`` asks for; a CUDA device without an index becomes this rank's GPU."""
        self._data_parallel = DataParallel.resolve(self.distributed, self.device)
        if self._data_parallel is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = th.device("cuda", local_rank())
            th.cuda.set_device(self.device)
        if self._data_parallel is not None:
            self._data_parallel.device = self.device

    def set_random_seed(self, seed: int | None = None) -> None:
        """
        Seed the RNGs, the action space and the envs; in data-parallel training each rank with
        ``seed + rank * n_envs``, so that the ranks' envs are seeded as one VecEnv of all of them would be.
        """
        data_parallel = getattr(self, "_data_parallel", None)
        if seed is not None and data_parallel is not None:
            seed += data_parallel.rank * self.n_envs
        super().set_random_seed(seed)

    def _algorithm_policy_kwargs(self) -> dict[str, Any]:
        """The policy's arguments that FastTD3 sets from its own: ``policy_kwargs`` may not hold them too."""
        kwargs = dict(
            num_atoms=self.num_atoms,
            v_min=self.v_min,
            v_max=self.v_max,
            use_target_actor=self.use_target_actor,
            average_actor=self.actor_average_tau is not None,
            normalize_observations=self.normalize_observations,
            clip_obs=self.clip_obs,
            epsilon=self.epsilon,
            epsilon_on_std=self.epsilon_on_std,
        )
        duplicates = sorted(set(kwargs) & set(self.policy_kwargs))
        if duplicates:
            raise ValueError(
                f"policy_kwargs must not contain {duplicates}: pass them to FastTD3 itself, e.g. "
                f"FastTD3(..., {duplicates[0]}=...), which hands them to the policy"
            )
        return kwargs

    def _create_aliases(self) -> None:
        self.actor = self.policy.actor
        self.critic = self.policy.critic
        self.critic_target = self.policy.critic_target
        self.actor_target = self.policy.actor_target
        # What the critic's optimizer trains (a features extractor shared with the actor is the actor's), and the
        # online parameters the soft update pairs one-to-one with the target's (the target's extractor copy included)
        self._critic_params = [param for group in self.critic.optimizer.param_groups for param in group["params"]]
        self._critic_polyak_params: list[th.Tensor] = list(self.critic.parameters())
        self._critic_target_params: list[th.Tensor] = list(self.critic_target.parameters())
        self._actor_params: list[th.Tensor] = list(self.actor.parameters())
        # SimbaV2 weights, put back on the unit sphere after each optimizer step (none with MLPs)
        self._actor_sphere_weights = hyperspherical_weights(self.actor)
        self._critic_sphere_weights = hyperspherical_weights(self.critic)
        # The actor's soft-updated pairs, less a target extractor shared with the critic target (updated with it)
        critic_target_params = {id(param) for param in self._critic_target_params}
        pairs = () if self.actor_target is None else zip(self.actor_target.parameters(), self._actor_params, strict=True)
        actor_pairs = [(target, online) for target, online in pairs if id(target) not in critic_target_params]
        self._actor_target_params: list[th.Tensor] = [target for target, _ in actor_pairs]
        self._actor_polyak_params: list[th.Tensor] = [online for _, online in actor_pairs]
        # BatchNorm running statistics: copied to the targets at each soft update (SB3's TD3 does the same)
        self._critic_batch_norm_stats = get_parameters_by_name(self.critic, ["running_"])
        self._critic_target_batch_norm_stats = get_parameters_by_name(self.critic_target, ["running_"])
        self._actor_batch_norm_stats = get_parameters_by_name(self.actor, ["running_"])
        self._actor_target_batch_norm_stats = (
            [] if self.actor_target is None else get_parameters_by_name(self.actor_target, ["running_"])
        )
        # The actor's moving average, paired one-to-one with the actor (its own copy of the extractor included)
        average = self.policy.actor_average
        self._actor_average_params: list[th.Tensor] = [] if average is None else list(average.parameters())
        self._actor_average_batch_norm_stats = [] if average is None else get_parameters_by_name(average, ["running_"])
        self._batch_norm_buffers = get_parameters_by_name(self.policy, ["running_", "num_batches_tracked"])
        self._update_statistics = UpdateStatistics(self.device)

    def _setup_fast_path(self) -> None:
        """The one place where speed switches apply: autocast, gradient scaling and compilation."""
        amp_dtype = self.amp_dtype
        if amp_dtype == "auto":
            amp_dtype = "bf16" if has_native_bf16(self.device) else None
        elif amp_dtype == "fp16" and self.device.type != "cuda":  # a model trained in fp16, loaded elsewhere
            amp_dtype = None
        self.autocast_dtype = dtype = AMP_DTYPES[amp_dtype]
        self._autocast = partial(th.autocast, device_type=self.device.type, dtype=dtype, enabled=dtype is not None)
        self._grad_scaler = th.amp.GradScaler("cuda") if dtype == th.float16 else None
        self._critic_loss_fn, self._actor_loss_fn, self._act_fn = self._critic_loss, self._actor_loss, self._noisy_actions
        if self.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._critic_loss_fn = _compile_for_this_model(self._critic_loss, mode)
            self._act_fn = _compile_for_this_model(self._noisy_actions, mode)
            # The actor's loss goes through the critic. Its compiled backward computes the critic's weight
            # gradients, which eager autograd skips (``backward(inputs=...)``), a third of the actor step's matrix
            # products; with the critic detached inside the graph instead, inductor saves the ReLU masks as bool
            # tensors, which its CPU kernels write several times slower than eager. So on a CPU it stays eager
            # (benchmarks/results/actor_loss_compile.md).
            if self.device.type != "cpu":
                self._actor_loss_fn = _compile_for_this_model(self._actor_loss, mode)

    @staticmethod
    def _wrap_env(env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        """SB3's, and a gymnasium ``VectorEnv`` as an SB3 VecEnv (with a ``VecMonitor``, as SB3 adds a ``Monitor``)."""
        if isinstance(env, VectorEnv):
            env = GymnasiumVecEnv(env)
            if monitor_wrapper and not any(env.env_is_wrapped(Monitor)):
                env = VecMonitor(env)
        return BaseAlgorithm._wrap_env(env, verbose, monitor_wrapper)

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        # Before the model lets go of its current env
        check_env_spaces(env)
        resolve_normalize_observations(env, self.normalize_observations)
        super().set_env(env, force_reset)
        self._last_obs_tensor = None
        buffer = getattr(self, "replay_buffer", None)
        if buffer is not None and not isinstance(buffer, DeviceNStepReplayBuffer):
            sb3_buffers.attach(buffer, self.env, self.device)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        self._last_obs_tensor = None
        if reset_num_timesteps or self._last_obs is None:
            # The envs are about to be reset: the next transitions do not follow the stored ones
            sb3_buffers.end_open_episodes(self.replay_buffer, quiet=True)
        action_noise = self.action_noise
        if isinstance(action_noise, VectorizedActionNoise) and action_noise.n_envs != self.n_envs:
            action_noise = action_noise.base_noise  # vectorized for another number of envs (loaded with another env)
        if action_noise is not None and self.n_envs > 1 and not isinstance(action_noise, VectorizedActionNoise):
            action_noise = VectorizedActionNoise(action_noise, self.n_envs)
        self.action_noise = action_noise
        self._transitions_per_step = self.n_envs
        if self._data_parallel is not None:
            callback, progress_bar = self._join_ranks(
                self._data_parallel, callback, progress_bar, total_timesteps, reset_num_timesteps
            )
        # OffPolicyAlgorithm's step is skipped: it marks SB3's lean buffer's newest row done, which
        # end_open_episodes has done where needed (FastTD3's lean buffer keeps that row's next observation)
        result = BaseAlgorithm._setup_learn(self, total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        check_finite_reset(self._last_obs)
        check_action_noise(self)  # SB3 lets model.action_noise be set after construction
        noise = self.exploration_noise
        settings = (self.n_envs, self.std_min, self.std_max, self.noise_correlation, self.stratified_noise)
        if self.action_noise is not None:
            self.exploration_noise = None  # SB3's action noise replaces the mixed noise
        elif noise is None or reset_num_timesteps or noise.settings != settings:  # the model's settings changed
            self.exploration_noise = self._make_exploration_noise()
        self._setup_device_rollouts()
        return result

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        callback = super()._init_callback(callback)
        if progress_bar:  # SB3's bar counts this process's envs, not every rank's
            callback = CallbackList([callback, TimestepsProgressBar()])
            callback.init_callback(self)
        return callback

    def _join_ranks(
        self,
        data_parallel: DataParallel,
        callback: MaybeCallback,
        progress_bar: bool,
        total_timesteps: int,
        reset_num_timesteps: bool,
    ) -> tuple[MaybeCallback, bool]:
        """
        Start a data-parallel ``learn()``, once every rank agrees on what keeps them in step (:func:`check_ranks`):
        rank 0's weights, normalizer and optimizer states on every rank, and the callbacks, logs and progress bar
        on rank 0 only (the others get none).
        """
        check_ranks(self, data_parallel, total_timesteps, reset_num_timesteps)
        self._transitions_per_step = self.n_envs * data_parallel.world_size
        states = [state for optimizer in (self.actor.optimizer, self.critic.optimizer) for state in optimizer.state.values()]
        optimizer_tensors = [value for state in states for value in state.values() if isinstance(value, th.Tensor)]
        data_parallel.broadcast_([*self.policy.state_dict().values(), *optimizer_tensors])
        if data_parallel.rank == 0:
            return callback, progress_bar
        self.set_logger(Logger(folder=None, output_formats=[]))
        return None, False

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """
        Save the model (see SB3's ``save``). In data-parallel training, where every rank holds the same model, only
        rank 0 writes to a path: the other ranks' calls return without writing (a file object is still written).
        """
        data_parallel = self._data_parallel
        if data_parallel is not None and data_parallel.rank != 0 and isinstance(path, (str, pathlib.Path)):
            return
        super().save(path, exclude, include)

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "_loading",
            "actor",
            "critic",
            "critic_target",
            "actor_target",
            "_critic_params",
            "_critic_polyak_params",
            "_critic_target_params",
            "_actor_params",
            "_actor_sphere_weights",
            "_critic_sphere_weights",
            "_actor_target_params",
            "_actor_polyak_params",
            "_critic_batch_norm_stats",
            "_critic_target_batch_norm_stats",
            "_actor_batch_norm_stats",
            "_actor_target_batch_norm_stats",
            "_actor_average_params",
            "_actor_average_batch_norm_stats",
            "_batch_norm_buffers",
            "exploration_noise",
            "_last_obs_tensor",
            "_acted_uniformly",
            "_update_statistics",
            "_autocast",
            "autocast_dtype",  # resolved again on load: "auto" depends on the machine
            "_grad_scaler",
            "_critic_loss_fn",
            "_actor_loss_fn",
            "_act_fn",
            "_data_parallel",
            "distributed",  # a model trained on several ranks loads as a plain one
        ]

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, th.Tensor],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        params: dict[str, Any] = load_path_or_dict  # type: ignore[assignment]
        if not isinstance(params, dict):
            _, params, _ = load_from_zip_file(params, device=device)
        # Parameters saved with the other critic layout (one module per Q-network, as before batched critics, or
        # batched) rebuild the policy with their layout: they load as saved, and nothing else of the model changes
        saved_batched = critics_are_batched(params.get("policy", {}))
        if saved_batched is not None and saved_batched != self.policy.batched_critics:
            self.policy_kwargs = {**self.policy_kwargs, "batched_critics": saved_batched}
            self._make_policy()
        super().set_parameters(params, exact_match, device)
        # torch's Optimizer.load_state_dict keeps the state tensors it is given: take copies, so that the dict of
        # another model's get_parameters() leaves the two models' optimizers independent
        for optimizer in (self.actor.optimizer, self.critic.optimizer):
            for state in optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, th.Tensor):
                        state[key] = value.clone()

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "actor.optimizer", "critic.optimizer"], []

    # ------------------------------------------------------------------ updates
    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        actor_lr, critic_lr = self._current_learning_rates()
        update_learning_rate(self.actor.optimizer, actor_lr)
        update_learning_rate(self.critic.optimizer, critic_lr)
        for replay_data in self._sample_batches(gradient_steps, batch_size):
            self._n_updates += 1
            self._update(replay_data, update_actor=self._n_updates % self.policy_delay == 0)
        self.policy.set_training_mode(False)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _current_learning_rates(self) -> tuple[float, float]:
        """
        The actor's and the critic's learning rates now. Where not overridden they follow ``lr_schedule`` as it
        is at call time, as SB3's algorithms do (a user may replace it between calls).
        """
        actor, critic = self._learning_rate_schedules()
        return actor(self._current_progress_remaining), critic(self._current_progress_remaining)

    def _learning_rate_schedules(self) -> tuple[Schedule, Schedule]:
        """The actor's and the critic's learning-rate schedules (``lr_schedule`` where not overridden)."""
        actor = self.lr_schedule if self.actor_learning_rate is None else self.actor_lr_schedule
        critic = self.lr_schedule if self.critic_learning_rate is None else self.critic_lr_schedule
        return actor, critic

    def _sample_batches(self, gradient_steps: int, batch_size: int) -> Iterator[Any]:
        """
        The minibatches of one ``train()`` call, each as the replay buffer returns them, gathered with one
        ``sample`` per group of updates: one large gather is cheaper than many small ones. SB3's buffers are
        sampled once per update: ``HerReplayBuffer`` returns its real transitions first and its relabelled ones
        after, so a split sample would give the updates different shares of each.
        """
        group = max(1, min(gradient_steps, MAX_SAMPLES_PER_GATHER // batch_size))
        if not isinstance(self.replay_buffer, DeviceNStepReplayBuffer):
            group = 1
        for start in range(0, gradient_steps, group):
            n_batches = min(group, gradient_steps - start)
            samples = self.replay_buffer.sample(batch_size * n_batches, env=self._vec_normalize_env)
            columns = [_split_batches(value, batch_size, n_batches) for value in samples]
            yield from (type(samples)(*fields) for fields in zip(*columns, strict=True))

    def _update(self, replay_data: Any, update_actor: bool) -> None:
        """One critic update, the delayed actor update when due, then the target soft updates."""
        self._begin_compiled_step()
        with self._autocast():
            critic_loss, q_mean = self._critic_loss_fn(replay_data)
        self._optimize(self.critic.optimizer, critic_loss, self._critic_params)
        project_weights_(self._critic_sphere_weights)
        self._update_statistics.add_critic_update(critic_loss, q_mean)
        if update_actor:
            with self._autocast():
                actor_loss = self._actor_loss_fn(replay_data.observations)
            self._optimize(self.actor.optimizer, actor_loss, self._actor_params)
            project_weights_(self._actor_sphere_weights)
            self._update_statistics.add_actor_update(actor_loss)
            if self.actor_target is not None:
                self._soft_update(self._actor_target_params, self._actor_polyak_params)
                self._copy_stats(self._actor_target_batch_norm_stats, self._actor_batch_norm_stats)
            if self._actor_average_params:
                self._soft_update(self._actor_average_params, self._actor_params, self.actor_average_tau)
                self._copy_stats(self._actor_average_batch_norm_stats, self._actor_batch_norm_stats)
        self._soft_update(self._critic_target_params, self._critic_polyak_params)
        self._copy_stats(self._critic_target_batch_norm_stats, self._critic_batch_norm_stats)
        if self._data_parallel is not None and self._batch_norm_buffers:
            # Each rank's BatchNorm layers saw its own batch: rank 0's statistics everywhere, as DDP does
            self._data_parallel.broadcast_(self._batch_norm_buffers)

    def _begin_compiled_step(self) -> None:
        """
        Tell CUDA graph trees that an update starts: outputs of the previous one may be overwritten from here on,
        while tensors saved for the backward passes of this one are kept.
        """
        if self.compile and self.device.type == "cuda":
            th.compiler.cudagraph_mark_step_begin()

    @th.no_grad()
    def _soft_update(self, target_params: list[th.Tensor], params: list[th.Tensor], tau: float | None = None) -> None:
        """
        Polyak averaging ``target <- target + tau * (online - target)``, outside autograd: recorded, it would
        chain one node per update onto every target weight (memory growing for the whole run).

        :param tau: the fraction of the way (``None``: ``self.tau``)
        """
        th._foreach_lerp_(target_params, params, self.tau if tau is None else tau)

    @staticmethod
    @th.no_grad()
    def _copy_stats(target_stats: list[th.Tensor], stats: list[th.Tensor]) -> None:
        if stats:
            th._foreach_copy_(target_stats, stats)

    def _optimize(self, optimizer: th.optim.Optimizer, loss: th.Tensor, params: Sequence[th.Tensor]) -> None:
        """
        One optimizer step on ``loss``, differentiating with respect to ``params`` (the optimizer's) only: the
        actor's loss goes through the critic, whose weight gradients it would otherwise compute for nothing
        (eager autograd skips them; a compiled backward computes them and drops them, see ``_setup_fast_path``).
        """
        optimizer.zero_grad(set_to_none=True)
        scaler = self._grad_scaler
        if scaler is None:
            loss.backward(inputs=params)
        else:
            scaler.scale(loss).backward(inputs=params)
        if self._data_parallel is not None:
            # Before unscaling: a non-finite gradient on one rank then makes every rank skip the step
            self._data_parallel.average_gradients_(params)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.max_grad_norm is not None:
            th.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def _target_distribution(self, replay_data: Any) -> th.Tensor:
        """Projected target distributions, shape (n_critics, batch, num_atoms) (all equal with CDQ)."""
        with th.no_grad():
            actor = self.actor_target if self.actor_target is not None else self.actor
            next_actions = actor(self.policy.actor_input(replay_data.next_observations))
            noise = (th.randn_like(next_actions) * self.target_policy_noise).clamp(
                -self.target_noise_clip, self.target_noise_clip
            )
            next_actions = (next_actions + noise).clamp(-1.0, 1.0)
            next_logits = self.critic_target(self.policy.critic_input(replay_data.next_observations), next_actions)
            next_probs = th.softmax(next_logits.float(), dim=-1)
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
            projected = th.stack(
                [
                    categorical_projection(probs, replay_data.rewards, 1.0 - replay_data.dones, discounts, self.policy.support)
                    for probs in next_probs
                ]
            )
            if not self.use_cdq:
                return projected
            # Clipped double Q: per sample, the target distribution with the smallest mean, for every critic
            smallest = (projected * self.policy.support).sum(dim=-1).argmin(dim=0)
            target = projected.gather(0, smallest.view(1, -1, 1).expand(1, -1, self.num_atoms))
            return target.expand_as(projected)

    def _critic_loss(self, replay_data: Any) -> tuple[th.Tensor, th.Tensor]:
        """Cross-entropy of each critic against its target, batch mean, summed over critics; and the mean Q."""
        target = self._target_distribution(replay_data)
        logits = self.critic(self.policy.critic_input(replay_data.observations), replay_data.actions)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        loss = -(target * log_probs).sum(dim=-1).mean(dim=-1).sum()
        q_mean = (log_probs.detach().exp() * self.policy.support).sum(dim=-1).mean()
        return loss, q_mean

    def _actor_loss(self, observations: th.Tensor | dict[str, th.Tensor]) -> th.Tensor:
        """Minus the expected Q of the actor's actions: the first critic's, or the smaller (CDQ) or mean of all."""
        actions = self.actor(self.policy.actor_input(observations))
        n_critics = 1 if self.actor_q == "q1" else None
        q_values = self.policy.q_values(self.critic, self.policy.critic_input(observations), actions, n_critics)
        q_value = q_values.min(dim=0).values if self.use_cdq else q_values.mean(dim=0)
        return -q_value.mean()

    # ------------------------------------------------------------------ logging
    def dump_logs(self) -> None:
        """Read the training statistics accumulated on the device (one host sync per log) and dump."""
        self._read_device_episodes()
        for name, mean in self._update_statistics.means().items():
            self.logger.record(f"train/{name}", mean)
        actor_lr, critic_lr = self._current_learning_rates()
        self.logger.record("train/learning_rate", self.lr_schedule(self._current_progress_remaining))  # SB3's key
        self.logger.record("train/actor_learning_rate", actor_lr)
        self.logger.record("train/critic_learning_rate", critic_lr)
        super().dump_logs()

    def learn(
        self: SelfFastTD3,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "FastTD3",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfFastTD3:
        try:
            super().learn(
                total_timesteps=total_timesteps,
                callback=callback,
                log_interval=log_interval,
                tb_log_name=tb_log_name,
                reset_num_timesteps=reset_num_timesteps,
                progress_bar=progress_bar,
            )
        except BaseException:
            if self._data_parallel is not None:
                self._data_parallel.fail()  # the other ranks may be waiting in a collective: do not wait for them
            raise
        self._read_device_episodes()  # ep_info_buffer up to date when learn() returns
        return self
