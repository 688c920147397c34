"""
How the replay buffer lays out a transition: observations split into a float32 part and a uint8 image part, the
columns of the packed float32 row, and the bits of the per-row flags.
"""

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_obs_shape, is_image_space

ArrayLike = np.ndarray | th.Tensor
ObsLike = ArrayLike | dict[str, ArrayLike]
TensorObs = th.Tensor | dict[str, th.Tensor]

# Bits of a row's flags: the VecEnv done, the truncation, whether the row's n-step window still grows as rows
# arrive, and whether the window's rows were split over two envs by a re-lay (their one-step rewards are not all
# stored after it anymore). The window's length minus one is stored above them.
DONE, TIMEOUT, OPEN, SPLIT = 1, 2, 4, 8
LENGTH_SHIFT = 4
# Largest n_steps whose window length fits in uint8 flags (above it the flags are int32)
MAX_N_STEPS_UINT8 = 1 << (8 - LENGTH_SHIFT)

# Next-observation references of the lean layout, stored as int32 bits in the float32 row. A reference of at least
# LAG_BASE means "the observation stored (reference - LAG_BASE) rows later, same env"; a smaller one is the running
# number, modulo LAG_BASE, of an entry of the final-observation store.
LAG_BASE = 1 << 30


def flags_dtype(n_steps: int) -> th.dtype:
    """:return: The dtype of the flags of a buffer with windows of up to ``n_steps`` rows"""
    return th.uint8 if n_steps <= MAX_N_STEPS_UINT8 else th.int32


def clear_bits(flags: th.Tensor, bits: int) -> th.Tensor:
    """:return: ``flags`` with ``bits`` cleared, in the dtype of ``flags``"""
    all_bits = 0xFF if flags.dtype == th.uint8 else -1
    return flags & (all_bits ^ bits)


def window_lengths(flags: th.Tensor) -> th.Tensor:
    """:return: The number of rows of each row's n-step window (int64), read from its flags"""
    return (flags.long() >> LENGTH_SHIFT) + 1


class ObservationCodec:
    """
    Splits observations (a ``Box``, ``Discrete``, ``MultiDiscrete`` or ``MultiBinary`` space, or a ``Dict`` of those)
    into two flat parts: a float32 part, every non-image key's values side by side (integers as exact float32
    values), and a uint8 part, the bytes of every key that SB3's ``is_image_space`` calls an image, side by side.
    Puts sampled parts back together with each key's shape, image keys as uint8.

    :param observation_space: The observation space
    """

    def __init__(self, observation_space: spaces.Space):
        self.is_dict = isinstance(observation_space, spaces.Dict)
        subspaces = observation_space.spaces if isinstance(observation_space, spaces.Dict) else {"": observation_space}
        self.shapes: dict[str, tuple[int, ...]] = {key: get_obs_shape(space) for key, space in subspaces.items()}  # type: ignore[misc]
        self.image_keys = [key for key, space in subspaces.items() if is_image_space(space)]
        self.float_slices: dict[str, slice] = {}
        self.image_slices: dict[str, slice] = {}
        float_width = image_width = 0
        for key, shape in self.shapes.items():
            size = int(np.prod(shape))
            if key in self.image_keys:
                self.image_slices[key] = slice(image_width, image_width + size)
                image_width += size
            else:
                self.float_slices[key] = slice(float_width, float_width + size)
                float_width += size
        self.float_width, self.image_width = float_width, image_width

    @property
    def has_images(self) -> bool:
        return self.image_width > 0

    def encode(self, obs: ObsLike, n_rows: int, device: th.device) -> tuple[th.Tensor, th.Tensor | None]:
        """
        :param obs: Observations with leading dimension ``n_rows`` (a dict of those for a ``Dict`` space)
        :param n_rows: Number of observations
        :param device: Device of the result
        :return: The float32 part ``(n_rows, float_width)`` and the uint8 part ``(n_rows, image_width)`` (None
            without image keys)
        """
        if self.is_dict:
            assert isinstance(obs, dict), "Dict observation space: the observations must be a dict"
            parts = obs
        else:
            assert not isinstance(obs, dict), "the observations must be an array, not a dict"
            parts = {"": obs}

        def rows(key: str, dtype: th.dtype) -> th.Tensor:
            return th.as_tensor(parts[key], device=device).reshape(n_rows, -1).to(dtype)

        floats = [rows(key, th.float32) for key in self.float_slices]
        if len(floats) == 1:
            float_part = floats[0]
        else:  # several keys, or none (image observations)
            float_part = th.cat(floats, dim=1) if floats else th.zeros((n_rows, 0), dtype=th.float32, device=device)
        if not self.has_images:
            return float_part, None
        images = [rows(key, th.uint8) for key in self.image_slices]
        return float_part, th.cat(images, dim=1) if len(images) > 1 else images[0]

    def decode(self, float_part: th.Tensor, image_part: th.Tensor | None) -> TensorObs:
        """
        :param float_part: Tensor of shape ``(..., float_width)``
        :param image_part: Tensor of shape ``(..., image_width)`` (None without image keys)
        :return: Views of the observation (or of each key) with their shapes; image keys keep the dtype of
            ``image_part``
        """
        keys = {}
        for key, shape in self.shapes.items():
            if key in self.image_slices:
                assert image_part is not None
                keys[key] = image_part[..., self.image_slices[key]].unflatten(-1, shape)
            else:
                keys[key] = float_part[..., self.float_slices[key]].unflatten(-1, shape)
        return keys if self.is_dict else keys[""]


class RowLayout:
    """
    Column ranges of the fields packed side by side in one float32 row per stored transition:
    ``observation (float part) | action | n-step return | signed discount | next``, where the signed discount is
    ``gamma ** rows_used``, negative when the window ends in a termination (no bootstrapping), and ``next`` is,
    in the full layout, the float part of the next observation and, in the lean layout, one int32 reference to
    where the next observation is stored (see :data:`LAG_BASE`). The fields a growing window rewrites (return to
    next) come last, so that they form one contiguous column range. Image parts go to a uint8 row of their own:
    ``observation | next observation`` in the full layout, ``observation`` in the lean one.

    :param float_width: Width of the float part of an observation
    :param action_dim: Dimension of the action
    :param image_width: Width of the uint8 part of an observation
    :param lean: Whether next observations are stored as references (lean) or in full
    """

    def __init__(self, float_width: int, action_dim: int, image_width: int, lean: bool):
        self.lean = lean
        self.obs = slice(0, float_width)
        self.action = slice(float_width, float_width + action_dim)
        self.n_step_return = self.window_start = self.action.stop
        self.discount = self.n_step_return + 1
        self.next = slice(self.discount + 1, self.discount + 1 + (1 if lean else float_width))
        self.width = self.next.stop
        self.image_obs = slice(0, image_width)
        self.image_next = slice(image_width, image_width if lean else 2 * image_width)
        self.image_width = self.image_next.stop
