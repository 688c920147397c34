"""The device of the tests marked ``device``: the CPU unless ``FASTTD3_TEST_DEVICE`` names another (the GPU check)."""

import os

import torch as th

TEST_DEVICE = th.device(os.environ.get("FASTTD3_TEST_DEVICE", "cpu"))
