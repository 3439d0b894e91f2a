"""Maps the layout's folders onto the one import name (metadata lives in pyproject.toml).

`server/` is the package `vlmserve` and `kernels/` is `vlmserve.kernels`; an install gets
`vlmserve.*` and nothing else at top level. The package list is derived from the folders, so
a new subpackage cannot be left out of the wheel.
"""

from setuptools import find_packages, setup

FOLDERS = {"vlmserve": "server", "vlmserve.kernels": "kernels"}


def _packages() -> list[str]:
    names = []
    for package, folder in FOLDERS.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(where=folder)]
    return names


setup(packages=_packages(), package_dir=FOLDERS)
