"""
Crash-safe training checkpoints: one zip file, written atomically, holding everything training needs to resume.

A checkpoint is a stored (uncompressed) zip with these members:

- ``model.zip``: the algorithm's own ``save`` (policy, optimizers, normalizer, counters, last observation,
  SB3 ``action_noise``, learning-rate progress)
- ``replay_buffer.pkl``: the replay buffer, pickled as ``save_replay_buffer`` does
- ``state.pt``: tensors and plain values only (loaded with ``torch.load(weights_only=True)``): every RNG state
  (torch CPU and CUDA, NumPy's global, Python's ``random``, the action space's, the envs' ``np_random``) and
  the mixed exploration noise's scales
- ``envs.pkl`` (when the envs allow it): the in-process envs of a ``DummyVecEnv``, pickled whole, with the state of
  the VecEnv wrappers around it and the seeds and options queued for its next reset
- ``manifest.json``: format version, what the checkpoint holds, and the SHA-256 of every other member

The manifest is checked before anything is unpickled, so that a truncated or corrupted file raises
:class:`CheckpointError` naming the file instead of failing inside pickle. Like SB3's own zips and replay
buffers, a checkpoint contains pickles: load only checkpoints you trust.
"""

import hashlib
import io
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import torch as th
from gymnasium.utils import EzPickle
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

FORMAT = "sb3_fasttd3.checkpoint"
VERSION = 1
MODEL, BUFFER, STATE, ENVS, MANIFEST = "model.zip", "replay_buffer.pkl", "state.pt", "envs.pkl", "manifest.json"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (missing, truncated, corrupted or not a checkpoint)."""


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """
    Write a file so that readers see either the previous file or the complete new one, even after a crash:
    write to a temporary file in the same directory, flush and fsync it, rename it onto ``path``, fsync the directory.

    :param path: the final file name
    :param write: called with the open binary temporary file; writes the content
    :return: the final path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp's 0600 would make checkpoints private, unlike other saves
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open a directory, where the rename is all we get
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ RNG state in tensor/plain form
def capture_global_rngs() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA, when present), NumPy's global and Python's ``random`` generators."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": th.get_rng_state(),
        "cuda": th.cuda.get_rng_state_all() if th.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": th.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_global_rngs(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_global_rngs` captured (CUDA states only where as many devices are present)."""
    th.set_rng_state(state["torch"])
    if state["cuda"] and th.cuda.is_available() and th.cuda.device_count() == len(state["cuda"]):
        th.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def generator_state(generator: np.random.Generator) -> dict[str, Any]:
    """A NumPy ``Generator``'s bit generator state (a dict of plain values)."""
    return dict(generator.bit_generator.state)


def make_generator(state: dict[str, Any]) -> np.random.Generator:
    """A NumPy ``Generator`` in the state :func:`generator_state` returned."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


# ------------------------------------------------------------------ envs
def dummy_vec_env(env: VecEnv | None) -> DummyVecEnv | None:
    """The ``DummyVecEnv`` under ``env``'s VecEnv wrappers, if any."""
    while isinstance(env, VecEnvWrapper):
        env = env.venv
    return env if isinstance(env, DummyVecEnv) else None


def vec_env_wrappers(env: VecEnv) -> list[VecEnvWrapper]:
    """``env``'s VecEnv wrappers, outermost first."""
    wrappers = []
    while isinstance(env, VecEnvWrapper):
        wrappers.append(env)
        env = env.venv
    return wrappers


def _wrapper_name(wrapper: VecEnvWrapper) -> str:
    return f"{type(wrapper).__module__}.{type(wrapper).__qualname__}"


def _wrapper_state(wrapper: VecEnvWrapper) -> dict[str, Any]:
    """What a VecEnv wrapper holds beyond the envs it wraps (e.g. ``VecFrameStack``'s frames, ``VecNormalize``'s
    statistics), which a resumed env must get back to go on exactly."""
    return {
        name: value
        for name, value in vars(wrapper).items()
        if name != "class_attributes" and not isinstance(value, VecEnv)  # the class's, and the wrapped chain
    }


def capture_envs(env: VecEnv | None) -> tuple[bytes | None, list[dict[str, Any]] | None]:
    """
    What can be captured of the envs: when they run in a ``DummyVecEnv`` and pickle, the envs themselves (their
    simulator state, wrappers' counters and RNGs) with the state of the VecEnv wrappers around them and the seeds
    and options queued for their next reset: an exact resume. Otherwise each env's ``np_random`` state when the
    VecEnv exposes it (the envs' physical state is then lost: they are reset on resume).

    :param env: the model's VecEnv
    :return: (pickled envs or None, list of ``np_random`` states or None)
    """
    if env is None:
        return None, None
    dummy = dummy_vec_env(env)
    if dummy is not None and any(_pickles_without_state(inner) for inner in dummy.envs):
        warnings.warn(
            "The envs pickle only their constructor arguments (gymnasium's EzPickle, as its MuJoCo and Box2D envs do), "
            "not their simulator state: only their np_random states are checkpointed, and they are reset on resume"
        )
    elif dummy is not None:
        saved = {
            "envs": dummy.envs,
            "wrappers": [(_wrapper_name(wrapper), _wrapper_state(wrapper)) for wrapper in vec_env_wrappers(env)],
            "seeds": dummy._seeds,
            "options": dummy._options,
        }
        try:
            return cloudpickle.dumps(saved), None
        except Exception as error:  # an env holding a renderer, a file or a simulator handle
            warnings.warn(f"The envs cannot be pickled ({error}): only their np_random states are checkpointed")
    try:
        return None, [generator_state(generator) for generator in env.get_attr("np_random")]
    except Exception:
        return None, None


def _pickles_without_state(env: gym.Env) -> bool:
    """Whether ``env`` or a wrapper in it pickles as gymnasium's ``EzPickle``: a new env from its constructor arguments."""
    while True:
        if type(env).__getstate__ is EzPickle.__getstate__:
            return True
        if not isinstance(env, gym.Wrapper):
            return False
        env = env.env


def load_envs(envs_bytes: bytes) -> dict[str, Any]:
    """What :func:`capture_envs` pickled (of checkpoints that hold only the envs: those, without wrapper states)."""
    saved = pickle.loads(envs_bytes)
    return saved if isinstance(saved, dict) else {"envs": saved, "wrappers": None}


def restore_envs(env: VecEnv, envs_bytes: bytes | None, rng_states: list[dict[str, Any]] | None) -> bool:
    """
    Put the captured envs (or their RNG states) into ``env``. The envs are restored only into a ``DummyVecEnv`` of
    as many envs, under VecEnv wrappers of the same types as the saved ones; otherwise the envs are reset on resume.

    :return: whether the envs' full state was restored (else they must be reset before training)
    """
    dummy = dummy_vec_env(env)
    if envs_bytes is not None and dummy is not None:
        saved = load_envs(envs_bytes)
        wrappers = vec_env_wrappers(env)
        names = [_wrapper_name(wrapper) for wrapper in wrappers]
        saved_wrappers = saved["wrappers"] or []  # None: not recorded, taken as none
        same_wrappers = names == [name for name, _ in saved_wrappers]
        if same_wrappers and len(saved["envs"]) == len(dummy.envs):
            dummy.envs[:] = saved["envs"]
            for wrapper, (_, state) in zip(wrappers, saved_wrappers, strict=True):
                vars(wrapper).update(state)
            # Instead of the seeds queued by make_vec_env(seed=...), which would override the restored RNGs
            dummy._seeds = saved.get("seeds", [None] * dummy.num_envs)
            dummy._options = saved.get("options", dummy._options)
            return True
        if not same_wrappers:
            warnings.warn(
                f"The checkpoint's envs were wrapped in {[name for name, _ in saved_wrappers]} and env in {names}: "
                "the envs are not restored but reset when training resumes"
            )
    if rng_states is not None and len(rng_states) == env.num_envs:
        for index, state in enumerate(rng_states):
            env.set_attr("np_random", make_generator(state), indices=[index])
        env.unwrapped._reset_seeds()  # seeds queued by make_vec_env(seed=...) would override the restored RNGs
    return False


# ------------------------------------------------------------------ the file
def write_checkpoint(path: str | os.PathLike, members: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    """
    Write the members and a manifest with their SHA-256 into one stored zip, atomically.

    :param path: the checkpoint file
    :param members: member name to content
    :param manifest: what the checkpoint holds (plain JSON values)
    :return: the final path
    """
    manifest = {**manifest, "format": FORMAT, "version": VERSION, "sha256": {k: _sha256(v) for k, v in members.items()}}

    def write(file: Any) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, content in members.items():
                archive.writestr(name, content)
            archive.writestr(MANIFEST, json.dumps(manifest, indent=1))

    return atomic_write(path, write)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, bytes]]:
    """
    Read and verify a checkpoint written by :func:`write_checkpoint` (nothing is unpickled here).

    :param path: the checkpoint file
    :return: (manifest, member name to content)
    :raises CheckpointError: the file is missing, truncated, corrupted or not a checkpoint
    """
    path = Path(path)
    accepted = "a checkpoint written by FastTD3.save_checkpoint or FastTD3CheckpointCallback"
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST))
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise CheckpointError(
                    f"{path} is not {accepted} of version {VERSION} (format={manifest.get('format')!r}, "
                    f"version={manifest.get('version')!r})"
                )
            members = {name: archive.read(name) for name in manifest["sha256"]}
    except CheckpointError:
        raise
    except FileNotFoundError as error:
        raise CheckpointError(f"No checkpoint at {path}: expected {accepted}") from error
    except Exception as error:  # zipfile, zlib, JSON and CRC errors of a truncated or damaged file
        raise CheckpointError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); expected {accepted}. "
            "Resume from an earlier checkpoint."
        ) from error
    for name, content in members.items():
        if _sha256(content) != manifest["sha256"][name]:
            raise CheckpointError(f"{path} is corrupted: the SHA-256 of its member {name} does not match its manifest")
    return manifest, members


def tensors_to_bytes(value: Any) -> bytes:
    """``torch.save`` of tensors and plain values, to bytes."""
    buffer = io.BytesIO()
    th.save(value, buffer)
    return buffer.getvalue()


def tensors_from_bytes(data: bytes) -> Any:
    """The inverse of :func:`tensors_to_bytes`, loading tensors and plain values only (on the CPU)."""
    return th.load(io.BytesIO(data), map_location="cpu", weights_only=True)
