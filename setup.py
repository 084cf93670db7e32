"""Banyan: a distributed job submission system on ZeroMQ, msgpack and LMDB."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="banyan",
    version="0.1.0",
    description="Distributed job submission: one durable broker, many workers, ZeroMQ + LMDB.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["banyan", "banyan.*"]),
    scripts=[str(p) for p in sorted(Path("bin").glob("banyan*"))],
    install_requires=[
        "pyzmq>=25,<28",
        "msgpack>=1.0,<2",
        "lmdb>=1.4,<4",
        "psutil>=5.9,<8",
        # docopt-ng is the maintained fork of docopt 0.6.2 and installs the same `docopt` module.
        "docopt-ng>=0.9,<0.10",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "pytest-timeout>=2.3,<3"],
        "dev": ["ruff>=0.6", "mypy>=1.10"],
    },
)
