"""
Train FastTD3 from pixels (CnnPolicy) on a small task drawn with NumPy: steer a dot to the centre of the image.

    python examples/train_from_pixels.py --timesteps 20000

The observation is a 1 x 36 x 36 uint8 image of the dot (and a faint mark at the centre); the action moves the dot;
the reward is minus its distance to the centre. No download and no rendering library are needed.
"""

import argparse

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_fasttd3 import FastTD3


class PixelReach(gym.Env):
    """
    A point in [-1, 1]^2, drawn as a 4 x 4 square, moves by ``step_size * action`` each step towards the centre
    (the origin); it starts anywhere and episodes last ``max_steps`` steps.

    :param size: height and width of the image (NatureCNN needs at least 36)
    :param max_steps: episode length
    :param step_size: largest move per step along each axis
    """

    def __init__(self, size: int = 36, max_steps: int = 15, step_size: float = 0.25):
        self.size, self.max_steps, self.step_size = size, max_steps, step_size
        self.observation_space = spaces.Box(0, 255, shape=(1, size, size), dtype=np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.agent = np.zeros(2)
        self.t = 0

    def _obs(self) -> np.ndarray:
        image = np.zeros(self.observation_space.shape, dtype=np.uint8)
        middle = self.size // 2
        image[0, middle - 1 : middle + 1, middle - 1 : middle + 1] = 60
        row, col = np.round((self.agent + 1.0) / 2.0 * (self.size - 4)).astype(int)
        image[0, row : row + 4, col : col + 4] = 255
        return image

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.agent = self.np_random.uniform(-1.0, 1.0, size=2)
        self.t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.agent = np.clip(self.agent + self.step_size * np.clip(action, -1.0, 1.0), -1.0, 1.0)
        self.t += 1
        reward = -float(np.linalg.norm(self.agent))
        return self._obs(), reward, False, self.t >= self.max_steps, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--n-envs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-path", default="fasttd3_pixels")
    args = parser.parse_args()

    env = make_vec_env(PixelReach, n_envs=args.n_envs, seed=args.seed)
    model = FastTD3(
        "CnnPolicy",
        env,
        learning_starts=min(2000, args.timesteps // 2),
        batch_size=64,
        gamma=0.8,
        actor_learning_rate=1e-4,
        critic_learning_rate=1e-3,
        num_atoms=51,
        v_min=-15.0,
        v_max=0.0,
        buffer_size=50_000,
        # A small CNN head: the images are simple, and a CPU trains it in minutes
        policy_kwargs=dict(net_arch=[128], features_extractor_kwargs=dict(features_dim=64)),
        verbose=1,
        seed=args.seed,
    )
    model.learn(total_timesteps=args.timesteps, log_interval=50)
    model.save(args.save_path)

    # Images and their preprocessing are part of the saved policy: the loaded model acts on raw uint8 frames
    model = FastTD3.load(args.save_path)
    eval_env = make_vec_env(PixelReach, n_envs=1, seed=args.seed + 1000)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=20)
    random_returns = []
    for episode in range(20):
        random_env = PixelReach()
        random_env.reset(seed=args.seed + 2000 + episode)
        random_env.action_space.seed(args.seed + 2000 + episode)
        random_returns.append(sum(random_env.step(random_env.action_space.sample())[1] for _ in range(random_env.max_steps)))
    print(f"evaluation return {mean_return:.1f} +/- {std_return:.1f} (random actions: {np.mean(random_returns):.1f})")


if __name__ == "__main__":
    main()
