"""
Everything is in pyproject.toml except one file setuptools cannot place by configuration:
``sb3_fasttd3_zoo.pth`` goes to the root of site-packages, next to the packages, for wheel and editable
installs alike. Its import line loads ``_sb3_fasttd3_zoo_hook``, which registers ``--algo fasttd3``
into the RL Zoo when the Zoo is imported.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "sb3_fasttd3_zoo.pth"


class BuildPyWithPth(build_py):
    """build_py that also ships the ``.pth`` file at the root of the wheel."""

    def run(self) -> None:
        super().run()
        # An editable wheel takes its root files from the directory `install` writes to
        target = self.distribution.get_command_obj("install").install_lib if self.editable_mode else self.build_lib
        if target is None:
            raise RuntimeError(f"cannot tell where to put {PTH_FILE} (editable_mode={self.editable_mode})")
        self.copy_file(str(Path(__file__).with_name(PTH_FILE)), str(Path(target, PTH_FILE)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_FILE))]


setup(cmdclass={"build_py": BuildPyWithPth})
