"""Leapfrog's typed configuration (configs.schema) and the TOML files it is read from (configs.files)."""
