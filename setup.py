"""Package list for setuptools (everything else is in pyproject.toml).

Every package under evomerge/ is found automatically, so a new subpackage cannot be left
out of the wheel; the top-level configs/ and fitness/ are added by name because they are
installed under other names (evomerge.configs, evomerge.fitness_tasks: see package-dir in
pyproject.toml), which setuptools' declarative find cannot express.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["evomerge", "evomerge.*"]), "evomerge.configs", "evomerge.fitness_tasks"])
