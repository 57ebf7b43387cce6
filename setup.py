"""Packages only; all other metadata is in setup.cfg."""

from setuptools import find_packages, setup

# every hf_sdft subpackage is found (a new one cannot be missed); model_cards/ sits at the top level
# and installs as hf_sdft.model_cards through setup.cfg's package_dir, which find_packages does not see
setup(packages=[*find_packages(include=["hf_sdft", "hf_sdft.*"]), "hf_sdft.model_cards"])
