"""Configuration: the one place the environment is read.

Every setting is an environment variable with the ``PYEXEC_`` prefix
(``PYEXEC_PORT=9000``). Names kept from the original service:
``PYEXEC_PORT``, ``PYEXEC_HOST``, ``PYEXEC_LOG_LEVEL``,
``PYEXEC_DEFAULT_TIMEOUT``, ``PYEXEC_DEFAULT_MEMORY_MB``,
``PYEXEC_DEFAULT_DISK_MB``, ``PYEXEC_DEFAULT_CPU_SHARES``,
``PYEXEC_CLEANUP_TTL``, ``PYEXEC_DEFAULT_IMAGE``.

Usage::

    settings = Settings()                 # from the environment
    settings = Settings(port=0, store="memory")   # explicit, in tests
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_workers() -> int:
    return 2 * (os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PYEXEC_", extra="ignore")

    # --- HTTP ---------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(False, description="JSON log lines instead of console ones.")

    # --- state and files ----------------------------------------------------
    data_dir: Path = Path("./data")
    run_dir: Path | None = Field(
        None,
        description="Where per-run work dirs live; must be reachable by the sandbox user. "
        "Default: /run/python-executor when root, else <data_dir>/runs.",
    )
    store: Literal["sqlite", "memory", "redis", "consul"] = "sqlite"
    cleanup_ttl: int = Field(86400, description="Seconds a finished execution is kept.")
    keep_workdirs: bool = Field(
        False,
        description="Keep work dirs of finished runs, named after them (debugging; every "
        "run then starts cold, without the pool).",
    )

    # --- queue and workers --------------------------------------------------
    queue: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = Field("pyexec", description="Prefix of every Redis key we use.")
    max_concurrent: int = Field(default_factory=_default_workers)
    max_queue: int = Field(100, description="Executions waiting beyond the running ones.")
    retry_after_seconds: int = 1
    run_workers: bool = Field(
        True,
        description="Run executions in this process; false makes `serve` an API-only node "
        "that only enqueues (needs queue=redis and `python-executor-server worker` nodes).",
    )
    node_id: str | None = Field(
        None,
        description="This node's identity in the Redis queue (default <hostname>-<pid>). A stable "
        "one lets a restarted worker settle what its previous life left at once.",
    )
    redis_lease_seconds: float = Field(
        10, gt=0, description="A node silent this long is presumed dead; its runs fail."
    )
    redis_max_project_bytes: int = Field(
        256 * 1024 * 1024,
        description="Largest exec project (as a tar) moved through Redis to a worker; more: 413.",
    )
    redis_project_ttl: int = Field(
        86400, description="Seconds a project waits in Redis for a worker to take it."
    )

    # --- sandbox ------------------------------------------------------------
    sandbox: Literal["bwrap", "docker"] = "bwrap"
    sandbox_host_uid: int = Field(
        1000, description="Host uid/gid the sandboxed processes run as (when root)."
    )
    seccomp: bool = True
    cgroup_root: str = Field(
        "python-executor", description="Name of our cgroup subtree under each hierarchy."
    )
    pool_enabled: bool = Field(True, description="bwrap: keep sandboxes started ahead of runs.")
    pool_size: int = Field(2, ge=0, description="bwrap: pre-started sandboxes kept per key.")
    pool_max_keys: int = Field(4, description="bwrap: (interpreter, network, ...) kept warm.")
    pool_refill_concurrency: int = Field(4, description="bwrap: sandboxes pre-starting at once.")
    pool_zygote: bool = Field(
        True,
        description="bwrap: fork pooled sandboxes without network from a zygote per key "
        "(each with namespaces, workspace, cgroup and filter of its own) instead of "
        "starting each with bwrap; needs root, cgroups and seccomp.",
    )
    pool_zygote_size: int = Field(
        8,
        ge=0,
        description="bwrap: forked sandboxes kept per key (pool_size otherwise): enough "
        "that sequential calls, whose forks are made after each answer, never wait for one.",
    )

    # --- limits: defaults and maxima -----------------------------------------
    default_timeout: int = 300
    max_timeout: int = 3600
    default_memory_mb: int = 1024
    max_memory_mb: int = 8192
    default_disk_mb: int = 2048
    max_disk_mb: int = 16384
    default_cpu_shares: int = 1024
    max_cpu_shares: int = 262144
    default_pids: int = 256
    output_cap_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_archive_entries: int = 100_000
    max_eval_code_bytes: int = 100 * 1024
    network_allow_cidrs: list[str] = Field(default_factory=list)
    network_deny_cidrs: list[str] = Field(
        default_factory=lambda: [
            "127.0.0.0/8",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "169.254.0.0/16",
            "100.64.0.0/10",
        ]
    )

    # --- interpreters and requirements ---------------------------------------
    python_interpreters: list[str] = Field(
        default_factory=list, description="Interpreter binaries to offer, searched first."
    )
    default_python: str | None = Field(None, description="Default python_version (e.g. 3.12).")
    auto_detect_imports: bool = True
    index_url: str | None = None
    extra_index_url: str | None = None
    offline_installs: bool = False
    wheels_only: bool = False
    install_timeout: int = 600
    envs_max_mb: int = 10240
    envs_dir: Path | None = Field(
        None,
        description="Where requirement environments live (default <data_dir>/envs); they are "
        "mounted into sandboxes at the same path, so the sandbox must be able to reach it.",
    )
    uv_cache_dir: Path | None = Field(
        None, description="Shared uv cache (default <data_dir>/uv-cache)."
    )
    install_isolation: Literal["sandbox", "host"] = Field(
        "sandbox",
        description="Run the installer in the sandbox backend (network on, nothing else of the "
        "host writable) or as a plain host process (trusted setups; pair with wheels_only).",
    )
    install_memory_mb: int = 2048
    respect_pip_config: bool = Field(
        True,
        description="With neither index_url nor extra_index_url set, translate the host's pip.conf "
        "files (index-url, extra-index-url, find-links, no-index, cert, constraint) for uv.",
    )

    # --- docker backend -----------------------------------------------------
    docker_socket: str = "unix:///var/run/docker.sock"
    default_image: str = "python-executor-sandbox:latest"
    docker_images: dict[str, str] = Field(default_factory=dict)
    docker_allowed_images: list[str] = Field(default_factory=list)
    docker_network: str = "bridge"
    docker_pool_size: int = Field(
        2, description="Warm containers kept per (image, network, limits); 0 turns the pool off."
    )
    docker_instance: str = Field(
        "default",
        description="Label of this server's containers; orphans with it are removed at start-up. "
        "Give each server sharing one Docker daemon its own.",
    )

    @property
    def envs_path(self) -> Path:
        return self.envs_dir if self.envs_dir is not None else self.data_dir / "envs"

    @property
    def uv_cache_path(self) -> Path:
        return self.uv_cache_dir if self.uv_cache_dir is not None else self.data_dir / "uv-cache"

    @property
    def runs_path(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        if os.geteuid() == 0:
            return Path("/run/python-executor")
        return self.data_dir / "runs"
