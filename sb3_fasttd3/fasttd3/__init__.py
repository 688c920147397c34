from sb3_fasttd3.fasttd3.fasttd3 import FastTD3
from sb3_fasttd3.fasttd3.policies import CnnPolicy, FastTD3Policy, MlpPolicy, MultiInputPolicy

__all__ = ["CnnPolicy", "FastTD3", "FastTD3Policy", "MlpPolicy", "MultiInputPolicy"]
