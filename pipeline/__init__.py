"""The pure core of nucleiscope, one subpackage per stage; no Ray anywhere in it.

Stages, bottom to top (a stage imports only stages below it; ``tests/test_layout.py``
checks the rule): ``common`` (errors, storage, image files, devices), ``slides``,
``tiling``, ``color``, ``networks`` (with the shipped weights), ``segmentation``,
``measure``, ``extraction``, ``evaluation``, ``training``, ``export`` (files for other tools), ``report``.
"""

from importlib import metadata

try:
    #: The installed version of nucleiscope (``nucleiscope --version``; recorded in run.json).
    __version__ = metadata.version("nucleiscope")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

#: Stage subpackages from the bottom up.
STAGES = (
    "common", "slides", "tiling", "color", "networks",
    "segmentation", "measure", "extraction", "evaluation", "training", "export", "report",
)  # fmt: skip
