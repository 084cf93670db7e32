"""snakemake-executor-plugin-banyan: Snakemake's jobs as Banyan jobs.

    snakemake --executor banyan --jobs 100

See docs/snakemake.md in the Banyan repository.
"""

# No `from __future__ import annotations` here: Snakemake reads these fields' types to make
# its command-line options.
from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase

from snakemake_executor_plugin_banyan.executor import Executor

__all__ = ["Executor", "ExecutorSettings", "common_settings"]


@dataclass
class ExecutorSettings(ExecutorSettingsBase):  # type: ignore[misc]
    broker: Optional[str] = field(
        default=None,
        metadata={
            "help": "The Banyan broker, HOST[:PORT] (default: $BANYAN_BROKER, else 127.0.0.1).",
            "env_var": False,
            "required": False,
        },
    )
    home: Optional[str] = field(
        default=None,
        metadata={
            "help": "The directory holding this machine's Banyan keys (default: $BANYAN_HOME, "
            "else ~/.banyan).",
            "env_var": False,
            "required": False,
        },
    )
    timeout: Optional[float] = field(
        default=None,
        metadata={
            "help": "Seconds before a broker that does not answer counts as away (default 10); "
            "while it is away the run waits for it.",
            "env_var": False,
            "required": False,
        },
    )
    spawn_snakemake: bool = field(
        default=False,
        metadata={
            "help": "Run every job through a spawned Snakemake, as other cluster plugins do, "
            "instead of running plain shell rules' commands directly.",
            "env_var": False,
            "required": False,
        },
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,  # jobs run in the workflow's directory (a shared filesystem)
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=False,  # --envvars travel in the Banyan job's env
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,
)
