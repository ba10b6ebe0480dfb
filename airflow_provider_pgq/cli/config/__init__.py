"""The classic skytools queue_mover ini file, read and validated (for the CLI only).

One section (the first one unless a name is given), configparser's %-interpolation,
and the keys the classic tool knew, so an existing queue_mover config runs as is.
Like skytools, ``job_name`` defaults to the config file's name without extension,
and ``%(job_name)s``, ``%(service_name)s`` (the section), ``%(host_name)s``,
``%(config_dir)s`` and ``%(config_file)s`` can be used in values.

Errors are one line and name the file, the section and the key. A connection string
is never repeated in a message: it may hold a password.

``model`` holds the keys and the validated result, ``reader`` the typed reading of
one value, ``load`` the file and section, ``sample`` the ``--ini`` output.
"""

from __future__ import annotations

from airflow_provider_pgq.cli.config.load import load_config
from airflow_provider_pgq.cli.config.model import (
    BUILTIN_KEYS,
    DEFAULT_CONNECTION_LIFETIME,
    DEFAULT_LOOP_DELAY,
    IGNORED_CLASSIC_KEYS,
    IGNORED_KEY_NOTES,
    KNOWN_KEYS,
    REQUIRED_KEYS,
    SECRET_KEYS,
    ConfigError,
    MoverConfig,
)
from airflow_provider_pgq.cli.config.reader import parse_interval
from airflow_provider_pgq.cli.config.sample import sample_ini

__all__ = [
    "BUILTIN_KEYS",
    "DEFAULT_CONNECTION_LIFETIME",
    "DEFAULT_LOOP_DELAY",
    "IGNORED_CLASSIC_KEYS",
    "IGNORED_KEY_NOTES",
    "KNOWN_KEYS",
    "REQUIRED_KEYS",
    "SECRET_KEYS",
    "ConfigError",
    "MoverConfig",
    "load_config",
    "parse_interval",
    "sample_ini",
]
