"""
The RL Zoo's scripts with FastTD3 registered by hand, for interpreters that skip the ``.pth`` hook::

    python -m sb3_fasttd3.zoo train --algo fasttd3 --env HalfCheetah-v5
    python -m sb3_fasttd3.zoo enjoy --algo fasttd3 --env HalfCheetah-v5 -f logs/

(``python -S``, or a Python that no longer runs ``import`` lines of ``.pth`` files). Any script of
:data:`SCRIPTS` takes the same arguments as ``python -m rl_zoo3.<script>``.
"""

import runpy
import sys

from sb3_fasttd3.zoo.registration import register

SCRIPTS = {
    "train": "rl_zoo3.train",
    "enjoy": "rl_zoo3.enjoy",
    "record_video": "rl_zoo3.record_video",
    "record_training": "rl_zoo3.record_training",
    "plot_train": "rl_zoo3.plots.plot_train",
    "all_plots": "rl_zoo3.plots.all_plots",
    "plot_from_file": "rl_zoo3.plots.plot_from_file",
}


def main(argv: list[str] | None = None) -> None:
    """
    Register FastTD3, then run one RL Zoo script as ``__main__``.

    :param argv: the script name then its arguments (default: ``sys.argv[1:]``)
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SCRIPTS:
        given = argv[0] if argv else None
        raise SystemExit(
            f"usage: python -m sb3_fasttd3.zoo SCRIPT [args...]; SCRIPT must be one of {list(SCRIPTS)}, got {given!r}"
        )
    register()
    script, *arguments = argv
    sys.argv = [SCRIPTS[script], *arguments]
    runpy.run_module(SCRIPTS[script], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
