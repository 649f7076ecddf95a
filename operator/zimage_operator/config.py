"""Operator settings: environment variables ``ZIMAGE_OPERATOR_*`` or ``zimage-operator`` flags."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

FIELD_MANAGER = "zimage-operator"


class OperatorSettings(BaseSettings):
    """Settings of the ZImageService operator."""

    model_config = SettingsConfigDict(
        env_prefix="ZIMAGE_OPERATOR_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="zimage-operator",
        extra="ignore",
    )

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to watch (comma-separated); empty means all namespaces"
    )
    default_server_image: str = Field(
        "zimage/zimage-server:0.1.0", description="Server image for a ZImageService that names none"
    )
    server_uid: int = Field(10001, description="Numeric user the server image runs as")
    resync_seconds: float = Field(
        15.0,
        gt=0,
        description="How often a service not yet settled (Ready, not Degraded) is reconciled again",
    )
    idle_resync_seconds: float = Field(
        300.0,
        gt=0,
        description="How often a settled service is reconciled again (its children are watched: drift "
        "shows at once; this catches what no watch sees, such as KEDA's objects)",
    )
    autoscale_seconds: float = Field(
        2.0, gt=0, description="How often the built-in autoscaler reads the load"
    )
    load_timeout_seconds: float = Field(1.0, gt=0, description="How long a pod's /load may take to answer")
    keda_prometheus_address: str = Field(
        "http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus that KEDA queries for the servers' metrics (autoscaling.mode keda)",
    )
    permission_check_seconds: float = Field(
        60.0, gt=0, description="How often the account's permissions are checked against what it needs"
    )
    health_host: str = Field("0.0.0.0", description="Address of the liveness endpoint")
    health_port: int = Field(8080, ge=1, le=65535)
    log_level: str = "info"
    leader_election: bool = Field(
        True, description="Act only while holding the Lease; other replicas stand by (election.py)"
    )
    lease_name: str = Field("zimage-operator", description="The Lease the replicas share")
    lease_namespace: str = Field("", description="The Lease's namespace; empty means the operator's own")
    lease_seconds: float = Field(15.0, ge=2, description="How long a Lease not renewed stays held")
    lease_retry_seconds: float = Field(2.0, gt=0, description="How often the Lease is renewed or tried")

    @model_validator(mode="after")
    def _lease_timing(self) -> OperatorSettings:
        if not self.lease_retry_seconds * 2 <= self.lease_seconds:
            raise ValueError(
                "leader election needs lease_retry_seconds at most half of lease_seconds "
                f"(got {self.lease_retry_seconds:g} and {self.lease_seconds:g}): the leader renews "
                "several times within a lease"
            )
        return self

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
