"""The presets (``*.yaml``) and full-size architecture configs (``arch/<name>/``), as a package.

This folder stays at the top of the repository (``--config configs/x.yaml``) and is installed as
``vlray.configs`` (see pyproject.toml), so an installed vlray finds these files with
``importlib.resources.files("vlray.configs")``.
"""
