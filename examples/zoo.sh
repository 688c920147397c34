#!/usr/bin/env bash
# FastTD3 in the RL Baselines3 Zoo, with no edit to rl_zoo3 and no -conf: installing sb3-fasttd3 registers
# `--algo fasttd3` (pip install "sb3-fasttd3[zoo]"), and the hyperparameters shipped in the package are
# the default config. Small step counts by default so that the whole script runs in a few minutes:
#
#   bash examples/zoo.sh                              # InvertedPendulum-v5 (MuJoCo, renders headless)
#   ENV_ID=HalfCheetah-v5 STEPS=100000 bash examples/zoo.sh
set -euo pipefail
ENV_ID=${ENV_ID:-InvertedPendulum-v5}
STEPS=${STEPS:-8000}
LOGS=${LOGS:-logs/zoo}
export MUJOCO_GL=${MUJOCO_GL:-egl}   # headless rendering for record_video (see docs/guide/install.md)
export MPLBACKEND=${MPLBACKEND:-Agg}

# Train with periodic evaluation (best_model.zip) and checkpoints; the observation normalizer is in the
# model, so evaluation, checkpoints and enjoy need no vecnormalize.pkl
python -m rl_zoo3.train --algo fasttd3 --env "$ENV_ID" -n "$STEPS" -f "$LOGS" \
  --eval-freq $((STEPS / 4)) --eval-episodes 5 --save-freq $((STEPS / 2))

# Watch it (without a display: --no-render) and record a video of the final model
python -m rl_zoo3.enjoy --algo fasttd3 --env "$ENV_ID" -f "$LOGS" -n 1000 --no-render
python -m rl_zoo3.record_video --algo fasttd3 --env "$ENV_ID" -f "$LOGS" -n 500 || \
  echo "record_video failed: MuJoCo rendering needs an OpenGL backend (MUJOCO_GL=egl or osmesa, see docs/guide/install.md)"

# Continue training the last run, and plot the training curves
LAST=$(ls -d "$LOGS/fasttd3/${ENV_ID}_"* | sort -V | tail -1)  # the highest run id
python -m rl_zoo3.train --algo fasttd3 --env "$ENV_ID" -n $((STEPS / 4)) -f "$LOGS" -i "$LAST/$ENV_ID.zip"
python -m rl_zoo3.plots.plot_train -a fasttd3 -e "$ENV_ID" -f "$LOGS"
python -m rl_zoo3.plots.all_plots -a fasttd3 -e "$ENV_ID" -f "$LOGS" -o "$LOGS/results"

# Hyperparameter search with FastTD3's own Optuna sampler (a few short trials)
python -m rl_zoo3.train --algo fasttd3 --env "$ENV_ID" -n $((STEPS / 4)) -f "$LOGS" \
  -optimize --n-trials 3 --n-evaluations 1 --sampler tpe --pruner median --eval-episodes 2
