"""
Register FastTD3 into the RL Baselines3 Zoo when, and only when, the Zoo is imported.

``sb3_fasttd3_zoo.pth`` (installed at the root of site-packages) imports this module at interpreter
start. It must stay cheap and silent: it imports nothing but the standard library, puts one finder on
``sys.meta_path`` and never raises. When one of the Zoo modules below has executed, the finder hands the
module to :func:`sb3_fasttd3.zoo.registration.patch_module`, which adds ``fasttd3`` to ``ALGOS``, the
Optuna dicts and the default config lookup. Without ``site`` (``python -S``) use
``python -m sb3_fasttd3.zoo train ...`` instead.
"""

import contextlib
import sys
import warnings

# The finder and loader follow the importlib protocols without subclassing importlib.abc, whose import
# alone costs more than the rest of this module at every interpreter start.

# The Zoo modules patched right after they execute (see sb3_fasttd3/zoo/registration.py)
PATCHED_MODULES = frozenset({"rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager"})


def _patch(module):
    try:
        from sb3_fasttd3.zoo.registration import patch_module

        patch_module(module)
    except Exception as error:  # never break the user's import of rl_zoo3
        with contextlib.suppress(Exception):  # -W error turns the warning into an exception: not ours to raise
            warnings.warn(
                f"sb3_fasttd3 could not register FastTD3 into {module.__name__} ({error!r}); "
                "use `python -m sb3_fasttd3.zoo train ...` instead",
                RuntimeWarning,
                stacklevel=2,
            )


class _PatchingLoader:
    """Runs the real loader, then patches the executed module; everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package... for tracebacks and inspect
        return getattr(self._loader, name)


class ZooFinder:
    """Finds the patched Zoo modules with the other finders and wraps their loaders."""

    def __init__(self):
        # Names being resolved: another copy of this finder (a second install) asking back gets None
        self._resolving = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHED_MODULES or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _PatchingLoader(spec.loader)
                    return spec
        except Exception:
            pass
        finally:
            self._resolving.discard(fullname)
        return None


def install():
    """Put the finder first on ``sys.meta_path`` (once) and patch Zoo modules that are already imported."""
    try:
        if not any(isinstance(finder, ZooFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, ZooFinder())
        for name in PATCHED_MODULES:
            if name in sys.modules:
                _patch(sys.modules[name])
    except Exception:
        pass


install()
