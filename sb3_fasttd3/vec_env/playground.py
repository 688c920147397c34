"""
MuJoCo Playground (JAX / MJX) tasks as a :class:`~sb3_fasttd3.vec_env.TorchVecEnv`.

The batch of environments lives in JAX; observations, rewards and flags reach torch through DLPack without a
copy, and actions go back the same way. The auto-reset is ours: Playground's own wrapper (0.2) drops the final
observation and, with ``full_reset=True``, clears the time-limit flag.
"""

import functools
import importlib
import subprocess
from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch as th
from gymnasium import spaces
from mujoco_playground import dm_control_suite, locomotion, manipulation, registry

from sb3_fasttd3.vec_env.base import TorchObs, TorchStep, TorchVecEnv

# The Playground releases whose private modules (menagerie paths, the domain-randomization wrapper) are used here
SUPPORTED_PLAYGROUND = ((0, 2), (0, 3))  # [0.2, 0.3)


def _private_playground_modules() -> tuple[Any, Any]:
    """
    ``mujoco_playground._src.mjx_env`` and ``mujoco_playground._src.wrapper``, behind one version check: they are
    not public API, so another release fails here with a clear error rather than deep inside a step.
    """
    installed = version("playground")
    release = tuple(int(part) for part in installed.split(".")[:2] if part.isdigit())
    (low, high), wanted = SUPPORTED_PLAYGROUND, "playground>=0.2,<0.3"
    error = f"sb3_fasttd3's PlaygroundVecEnv uses MuJoCo Playground's private modules as of {wanted}, found {installed}"
    if not low <= release < high:
        raise ImportError(f"{error}: install {wanted}")
    try:
        return importlib.import_module("mujoco_playground._src.mjx_env"), importlib.import_module(
            "mujoco_playground._src.wrapper"
        )
    except ImportError as err:
        raise ImportError(f"{error}, where they could not be imported: install {wanted}") from err


mjx_env, _wrapper = _private_playground_modules()
BraxDomainRandomizationVmapWrapper = _wrapper.BraxDomainRandomizationVmapWrapper

# fn(mjx_model, rng of shape (num_envs, 2)) -> (batched mjx_model, in_axes), as registry.get_domain_randomizer returns
RandomizationFn = Callable[[Any, jax.Array], tuple[Any, Any]]


def playground_tasks() -> dict[str, tuple[str, ...]]:
    """
    Playground's registered tasks by suite. ``dm_control_suite`` tasks ship their models and work offline;
    ``locomotion`` and ``manipulation`` (robot tasks) load MuJoCo Menagerie models, fetched with git on first use.
    """
    return {
        "dm_control_suite": tuple(dm_control_suite.ALL_ENVS),
        "locomotion": tuple(locomotion.ALL_ENVS),
        "manipulation": tuple(manipulation.ALL_ENVS),
    }


def needs_menagerie(task: str) -> bool:
    """Whether a registered Playground task loads its robot model from MuJoCo Menagerie."""
    return task in locomotion.ALL_ENVS or task in manipulation.ALL_ENVS


def _menagerie_error(task: str, cause: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Playground task {task!r} needs the MuJoCo Menagerie robot models, which could not be loaded ({cause!r}). "
        f"Playground looks for them in {mjx_env.MENAGERIE_PATH} and clones them with git on first use, which needs "
        "network access. Provide them with: git clone https://github.com/google-deepmind/mujoco_menagerie.git "
        f"{mjx_env.MENAGERIE_PATH} && git -C {mjx_env.MENAGERIE_PATH} checkout {mjx_env.MENAGERIE_COMMIT_SHA}"
    )


def _load_task(task: str, impl: str, config_overrides: Mapping[str, Any] | None) -> Any:
    """Build a registered Playground task, with the simulator ``impl`` unless ``config_overrides`` sets it."""
    if task not in registry.ALL_ENVS:
        raise ValueError(f"task={task!r} is not a MuJoCo Playground task; registered tasks: {playground_tasks()}")
    overrides = dict(config_overrides or {})
    if "impl" in registry.get_default_config(task):
        overrides.setdefault("impl", impl)
    try:
        return registry.load(task, config_overrides=overrides)
    except (subprocess.CalledProcessError, OSError, ValueError) as error:
        if not needs_menagerie(task):
            raise
        raise _menagerie_error(task, error) from error


def _jax_device(device: th.device) -> jax.Device:
    """The JAX device whose arrays torch sees on ``device`` through DLPack."""
    platform = {"cpu": "cpu", "cuda": "gpu"}.get(device.type)
    try:
        candidates = jax.devices(platform) if platform else []
    except RuntimeError:  # JAX has no backend for this platform
        candidates = []
    index = device.index or 0
    if index >= len(candidates):
        raise ValueError(
            f"device={str(device)!r} has no matching JAX device (JAX devices: {jax.devices()}); "
            "pass the torch device of a JAX device, e.g. device='cpu' with a CPU-only jaxlib"
        )
    return candidates[index]


def _torch_device(device: jax.Device) -> th.device:
    return th.device("cpu") if device.platform == "cpu" else th.device("cuda", device.id)


def _box(shape: tuple[int, ...], dtype: Any) -> spaces.Box:
    return spaces.Box(-np.inf, np.inf, shape=tuple(shape), dtype=np.dtype(dtype))


def _observation_space(obs: Any) -> spaces.Space:
    """Box (or Dict of Box) for one env's observation, given its (abstract) array or dict of arrays."""
    if isinstance(obs, Mapping):
        return spaces.Dict({key: _box(value.shape, value.dtype) for key, value in obs.items()})
    return _box(obs.shape, obs.dtype)


def _split(keys: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """Split each env's key into ``num`` keys: returns ``num`` arrays of shape ``(num_envs, 2)``."""
    split = jax.vmap(lambda key: jax.random.split(key, num))(keys)
    return tuple(split[:, i] for i in range(num))


def _strong(tree: Any) -> Any:
    """Drop weak types, so that the batch has the same types after a reset and after a step (no retracing)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)


def _where(done: jax.Array, fresh: jax.Array, current: jax.Array) -> jax.Array:
    """``fresh`` for the envs flagged in ``done``, ``current`` for the others (any trailing shape)."""
    mask = done.reshape(done.shape + (1,) * (current.ndim - 1))
    return jnp.where(mask, fresh.astype(current.dtype), current)


def _is_none(x: Any) -> bool:
    return x is None


def _to_torch(tree: Any) -> Any:
    """Zero-copy torch views of JAX arrays (dicts of arrays give dicts of tensors)."""
    if isinstance(tree, Mapping):
        return {key: th.from_dlpack(value) for key, value in tree.items()}
    return th.from_dlpack(tree)


def _actions_for_jax(actions: th.Tensor) -> Any:
    """
    Torch actions as an argument of a jitted JAX call. On the CPU, the NumPy view, which the call takes an order of
    magnitude faster than a tensor imported through DLPack or a ``device_put``. Elsewhere a zero-copy DLPack
    import: JAX reads the torch memory, and the step's outputs are ready (DLPack export waits)
    before torch may reuse it.
    """
    actions = actions.detach().contiguous()
    return actions.numpy() if actions.device.type == "cpu" else jax.dlpack.from_dlpack(actions)


class _Batch(NamedTuple):
    """
    The JAX state of the whole batch: Playground states, steps taken in the episode, per-env PRNG keys, and
    a pool with one prepared reset state per env (``pool_used``: already given out, to be drawn again).
    """

    state: Any
    steps: jax.Array
    keys: jax.Array
    pool: Any
    pool_used: jax.Array


class _Packer:
    """
    Packs a pytree of arrays into one flat array per dtype, and back. JAX's dispatch of a jitted call costs per
    argument and per result leaf, and a Playground state has about a hundred leaves (twice that with the reset
    pool): more than a small batch's physics. Packed, the batch is a handful of arrays; inside the jitted step the
    unpacking is free (slices) and the packing one copy.

    :param example: the pytree (or its ``jax.eval_shape``)
    """

    def __init__(self, example: Any):
        leaves, self.treedef = jax.tree.flatten(example)
        self.dtypes = sorted({jnp.dtype(leaf.dtype) for leaf in leaves}, key=str)
        self.places: list[tuple[int, int, int, tuple[int, ...]]] = []  # (group, start, size, shape) of each leaf
        sizes = [0] * len(self.dtypes)
        for leaf in leaves:
            group, size = self.dtypes.index(jnp.dtype(leaf.dtype)), int(np.prod(leaf.shape, dtype=np.int64))
            self.places.append((group, sizes[group], size, tuple(leaf.shape)))
            sizes[group] += size

    def pack(self, tree: Any) -> tuple[jax.Array, ...]:
        parts: list[list[jax.Array]] = [[] for _ in self.dtypes]
        leaves = self.treedef.flatten_up_to(tree)  # type: ignore[attr-defined]  # missing from JAX's stubs
        for leaf, (group, *_) in zip(leaves, self.places, strict=True):
            parts[group].append(jnp.ravel(leaf))
        return tuple(jnp.concatenate(group_parts) for group_parts in parts)

    def unpack(self, packed: tuple[jax.Array, ...]) -> Any:
        leaves = [packed[group][start : start + size].reshape(shape) for group, start, size, shape in self.places]
        return self.treedef.unflatten(leaves)  # type: ignore[attr-defined]  # missing from JAX's stubs


class PlaygroundVecEnv(TorchVecEnv):
    """
    A batch of MuJoCo Playground environments stepped by one jitted, vmapped JAX function.

    Each step returns the observation reached before any reset as ``final_observation``; an episode ends with
    ``terminated`` when the task reports ``done`` and with ``truncated`` when it reaches ``episode_length``
    steps without terminating. Finished envs restart from a fresh reset with their own key.

    The tensors returned share memory with JAX buffers (DLPack): treat them as read-only, clone before an
    in-place operation.

    :param task: name of a task in ``mujoco_playground.registry`` (see :func:`playground_tasks`), or an already
        built Playground environment (an object with ``reset(rng)``, ``step(state, action)`` and ``action_size``)
    :param num_envs: number of environments
    :param device: torch device of the tensors; it must be the device of JAX's arrays ("cpu" with a CPU-only
        jaxlib). "auto": JAX's default device
    :param impl: MJX implementation, put into the task's config ("jax"; Playground's default "warp" is very slow
        on CPU). Ignored for a built environment
    :param episode_length: time limit in steps (default: the task config's ``episode_length``, else 1000)
    :param config_overrides: task config overrides, as ``registry.load`` takes them (an ``impl`` here wins over ``impl``)
    :param randomization_fn: domain randomization, ``fn(mjx_model, rng) -> (batched model, in_axes)`` with ``rng``
        of shape ``(num_envs, 2)``, e.g. ``registry.get_domain_randomizer(task)``
    :param randomize_episode_start: start each env at a random step in ``[0, episode_length)`` after
        :meth:`reset`, so that time-limit truncations are spread over time
    :param seed: seed of the first reset and of the domain randomization
    :param render_size: ``(height, width)`` of the images of :meth:`get_images`
    """

    render_mode = "rgb_array"

    def __init__(
        self,
        task: str | Any,
        num_envs: int,
        device: th.device | str = "auto",
        impl: str = "jax",
        episode_length: int | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        randomization_fn: RandomizationFn | None = None,
        randomize_episode_start: bool = False,
        seed: int = 0,
        render_size: tuple[int, int] = (240, 320),
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be at least 1")
        if isinstance(task, str):
            self.env = _load_task(task, impl, config_overrides)
        elif config_overrides:
            raise ValueError("config_overrides only applies to a task name, not to an already built environment")
        else:
            self.env = task
        self.jax_device = jax.devices()[0] if device == "auto" else _jax_device(th.device(device))
        config_length = getattr(getattr(self.env, "_config", None), "episode_length", 1000)
        self.episode_length = int(episode_length or config_length)
        if self.episode_length < 1:
            raise ValueError(f"episode_length={self.episode_length} must be at least 1")
        self.randomize_episode_start = randomize_episode_start
        self.render_size = render_size
        self._reset_one, self._batched_step = self._env_functions(num_envs, randomization_fn, seed)
        obs = jax.eval_shape(self.env.reset, jax.random.PRNGKey(0)).obs
        action_space = spaces.Box(-1.0, 1.0, shape=(self.env.action_size,), dtype=np.float32)
        super().__init__(num_envs, _observation_space(obs), action_space, _torch_device(self.jax_device))
        self._keys = self._seed_keys(seed)
        self._packer = _Packer(jax.eval_shape(self._reset_batch, self._keys))
        self._reset_jit = jax.jit(self._packed_reset)
        # The packed batch is not used after a step: XLA may write the next one in its place
        self._step_jit = jax.jit(self._packed_step, donate_argnums=0)
        # Kept out of the step: XLA:CPU pays at every call for the size of a conditional's branches, taken or not
        self._restart_jit = jax.jit(self._packed_restart, donate_argnums=0)
        self._keys_jit = jax.jit(lambda packed: self._packer.unpack(packed).keys)
        self._packed: tuple[jax.Array, ...] | None = None
        self._obs: Any = None  # the JAX arrays of the last observations (torch holds views of them)

    def _env_functions(self, num_envs: int, randomization_fn: RandomizationFn | None, seed: int) -> tuple[Callable, Callable]:
        """``reset(env_index, key)`` of one env and the batched ``step(states, actions)``, on randomized models if asked."""
        if randomization_fn is None:
            return lambda index, key: self.env.reset(key), jax.vmap(self.env.step)
        rng = jax.device_put(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 1), num_envs), self.jax_device)
        randomize = functools.partial(randomization_fn, rng=rng)  # type: ignore[call-arg]  # passed by keyword
        randomized = BraxDomainRandomizationVmapWrapper(self.env, randomize)
        models, in_axes = randomized._mjx_model_v, randomized._in_axes

        def reset(index: jax.Array, key: jax.Array) -> Any:
            model = jax.tree.map(lambda axis, x: x if axis is None else x[index], in_axes, models, is_leaf=_is_none)
            with randomized.v_env_fn(model) as env:
                return env.reset(key)

        return reset, randomized.step

    def _seed_keys(self, seed: int) -> jax.Array:
        # Committed to the device (as DLPack actions are), so that steps after a reset hit the same compiled step
        return jax.device_put(jax.random.split(jax.random.PRNGKey(seed), self.num_envs), self.jax_device)

    def _reset_batch(self, keys: jax.Array) -> _Batch:
        """Reset every env (jitted): fresh states, step counters at 0 or random, next keys."""
        keys, reset_keys, start_keys = _split(keys, 3)
        state = self._fresh_states(reset_keys)
        if self.randomize_episode_start:
            steps = jax.vmap(lambda key: jax.random.randint(key, (), 0, self.episode_length))(start_keys)
        else:
            steps = jnp.zeros(keys.shape[0], dtype=jnp.int32)
        # The pool starts used up: it is drawn the first time an episode ends
        return _Batch(state, steps.astype(jnp.int32), keys, state, jnp.ones(keys.shape[0], dtype=bool))

    def _step_batch(self, batch: _Batch, actions: jax.Array) -> tuple[_Batch, tuple[Any, ...]]:
        """
        Step every env (jitted) and restart the finished ones from the pool. Returns the next batch, the rewards,
        the flags ``terminated``, ``truncated`` and ``waiting`` (finished, but its prepared state was already
        taken: :meth:`_restart_waiting` restarts it) stacked as ``(3, num_envs)``, and the final observations.
        """
        reached = _strong(self._batched_step(batch.state, actions))
        steps = batch.steps + 1
        terminated = reached.done.astype(bool)  # Playground's done is a float 0/1
        truncated = (steps >= self.episode_length) & ~terminated
        done = terminated | truncated
        take = done & ~batch.pool_used
        # Most steps end no episode: skip the selection over the whole state tree then
        state = jax.lax.cond(
            take.any(), lambda: jax.tree.map(functools.partial(_where, take), batch.pool, reached), lambda: reached
        )
        flags = jnp.stack([terminated, truncated, done & batch.pool_used])
        next_batch = batch._replace(state=state, steps=jnp.where(done, 0, steps), pool_used=batch.pool_used | take)
        return next_batch, (reached.reward.astype(jnp.float32), flags, reached.obs)

    def _restart_waiting(self, batch: _Batch, waiting: jax.Array) -> _Batch:
        """
        Refill the pool (jitted): a fresh reset state for every env whose prepared one was taken, then restart the
        ``waiting`` envs from theirs. A reset can cost many physics steps (CheetahRun settles for 200), so all envs
        are refilled at once, and only when an env needs a state it already took.
        """
        keys, reset_keys = _split(batch.keys, 2)
        pool = jax.tree.map(functools.partial(_where, batch.pool_used), self._fresh_states(reset_keys), batch.pool)
        state = jax.tree.map(functools.partial(_where, waiting), pool, batch.state)
        return _Batch(state, batch.steps, keys, pool, waiting)

    def _packed_reset(self, keys: jax.Array) -> tuple[tuple[jax.Array, ...], Any]:
        """Reset every env (jitted): the packed batch, and the observations stacked twice (see :meth:`_packed_step`)."""
        batch = self._reset_batch(keys)
        return self._packer.pack(batch), jax.tree.map(lambda obs: jnp.stack([obs, obs]), batch.state.obs)

    def _packed_step(self, packed: tuple[jax.Array, ...], actions: jax.Array) -> tuple[tuple[jax.Array, ...], Any, Any]:
        """
        Step every env (jitted) on the packed batch. Returns the next packed batch; the observation and the final
        observation stacked as one array of shape ``(2, num_envs, ...)`` per observation key; the rewards; the
        flags of :meth:`_step_batch`. Few results, each a contiguous torch view.
        """
        batch, (reward, flags, final_obs) = self._step_batch(self._packer.unpack(packed), actions)
        obs = jax.tree.map(lambda now, final: jnp.stack([now, final]), batch.state.obs, final_obs)
        return self._packer.pack(batch), obs, (reward, flags)

    def _packed_restart(self, packed: tuple[jax.Array, ...], obs: Any, flags: jax.Array) -> tuple[tuple[jax.Array, ...], Any]:
        """
        :meth:`_restart_waiting` on the packed batch (jitted), for the ``waiting`` row of the step's ``flags``;
        the reset observations go into the stacked ``obs``.
        """
        batch = self._restart_waiting(self._packer.unpack(packed), flags[2])
        return self._packer.pack(batch), jax.tree.map(lambda pair, now: pair.at[0].set(now), obs, batch.state.obs)

    def _fresh_states(self, keys: jax.Array) -> Any:
        """A reset state for every env (each with its own model under domain randomization)."""
        return _strong(jax.vmap(self._reset_one)(jnp.arange(keys.shape[0]), keys))

    def _reset(self, seed: int | None) -> TorchObs:
        if seed is not None:
            keys = self._seed_keys(seed)
        else:  # go on with the batch's own keys (a new reset never repeats the previous ones)
            keys = self._keys if self._packed is None else self._keys_jit(self._packed)
        self._packed, self._obs = self._reset_jit(keys)
        return jax.tree.map(lambda obs: _to_torch(obs)[0], self._obs)

    def _step(self, actions: th.Tensor) -> TorchStep:
        if self._packed is None:
            raise RuntimeError("reset() the environment before stepping it")
        self._packed, self._obs, (reward, flags) = self._step_jit(self._packed, _actions_for_jax(actions))
        terminated, truncated, waiting = _to_torch(flags)
        # One flag read per step (on a GPU, XLA's own conditional reads its predicate on the host too); true only
        # when an env ends a second episode before the pool was refilled: at the first episode end, then about
        # once per episode length with spread-out starts
        if waiting.any():
            self._packed, self._obs = self._restart_jit(self._packed, self._obs, flags)
        both = jax.tree.map(_to_torch, self._obs)
        obs, final_obs = (jax.tree.map(lambda pair, i=i: pair[i], both) for i in (0, 1))
        return TorchStep(obs, _to_torch(reward), terminated, truncated, final_obs)

    @property
    def state(self) -> Any:
        """A copy of the current batched Playground state (JAX), e.g. for rendering or inspection."""
        return None if self._packed is None else self._packer.unpack(self._packed).state

    @property
    def observation_arrays(self) -> Any:
        """
        The JAX arrays that the last observations returned are views of: one array of shape ``(2, num_envs, ...)``
        per observation key, the observations then the final observations (after a reset: the observations twice).
        """
        return self._obs

    def get_images(self) -> list[np.ndarray]:
        """One RGB image per env of the current state (needs an OpenGL backend: MUJOCO_GL=egl or osmesa)."""
        state = self.state
        if state is None:
            raise RuntimeError("reset() the environment before rendering it")
        states = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(self.num_envs)]
        height, width = self.render_size
        try:
            return list(self.env.render(states, height=height, width=width))
        except Exception as error:  # the error depends on the missing GL backend
            raise RuntimeError(
                f"Rendering Playground states failed ({error!r}). MuJoCo needs an OpenGL backend: on a headless "
                "machine set MUJOCO_GL=egl (or osmesa, with libOSMesa installed) before mujoco is imported."
            ) from error
