"""Distribution `mu2net`: one import namespace mapped from the repository's top-level folders."""

from setuptools import setup

_SUBPACKAGES = {
    "mu2net.tasks": "tasks",
    "mu2net.mixtures": "mixtures",
    "mu2net.evolution": "evolution",
    "mu2net.gin": "gin",
}


def _read_version():
    scope = {}
    with open("mu2net/version.py") as f:
        exec(f.read(), scope)  # noqa: S102 - our own version file, not data
    return scope["__version__"]


setup(
    name="mu2net",
    version=_read_version(),
    description="Continually extended, sparsely activated multitask systems (the µ2Net method).",
    python_requires=">=3.10",
    packages=[
        "mu2net",
        "mu2net.system",
        "mu2net.models",
        "mu2net.train",
        "mu2net.serve",
        *_SUBPACKAGES,
    ],
    package_dir={"mu2net": "mu2net", **_SUBPACKAGES},
    package_data={"mu2net.gin": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    include_package_data=True,
    entry_points={"console_scripts": ["mu2net=mu2net.cli:main"]},
    extras_require={"t5x": []},
)
