"""The build's one extra step: copy the top-level conf/ and recipes/ into the package, so an
installed wheel has them (a source checkout reads them where they are)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders
            return
        for name in ("conf", "recipes"):
            shutil.copytree(name, Path(self.build_lib) / "rlkit" / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
