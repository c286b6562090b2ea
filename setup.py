"""Package list for setuptools (everything else is in pyproject.toml).

Every package under evomerge/ is found automatically, so a new subpackage cannot be left
out of the wheel; the top-level configs/ and fitness/ are added by name because they are
installed under other names (evomerge.configs, evomerge.fitness_tasks: see package-dir in
pyproject.toml), which setuptools' declarative find cannot express.

Builds go to a temporary folder, not build/ in the source tree (``pip wheel .`` left a
build/ folder behind, which a later editable install or test could pick up).
"""

import atexit
import shutil
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build import build


class BuildOutsideTheTree(build):
    def initialize_options(self):
        super().initialize_options()
        self.build_base = tempfile.mkdtemp(prefix="evomerge-build-")
        atexit.register(shutil.rmtree, self.build_base, True)


setup(
    packages=[*find_packages(include=["evomerge", "evomerge.*"]), "evomerge.configs", "evomerge.fitness_tasks"],
    cmdclass={"build": BuildOutsideTheTree},
)
