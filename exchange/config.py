"""Node settings: ``node.toml`` in the node directory, overridden by ``EXCHANGE_*`` variables.

Settings are built by :func:`load_settings` inside the app factory or a CLI command, never at
import time. Defensive limits (body size, clock skew, replay window) are named settings.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeGuard

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from exchange.errors import ConfigurationError
from exchange.types import PartyId

NODE_FILE = "node.toml"
MIN_PASSPHRASE_LENGTH = 12
MIN_PASSPHRASE_DISTINCT = 8
#: words that make a passphrase guessable whatever digits or punctuation surround them
_PLACEHOLDERS = {
    "changeme",
    "changethis",
    "password",
    "passphrase",
    "secret",
    "qwerty",
    "letmein",
    "admin",
    "welcome",
    "exchange",
}
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["json", "text"]


class NodeSettings(BaseSettings):
    """Everything a node process needs to know about itself.

    Paths are relative to ``node_dir`` unless absolute.
    """

    model_config = SettingsConfigDict(env_prefix="EXCHANGE_", extra="forbid")

    node_dir: Path
    party: PartyId
    database_url: str = ""
    database_pool_size: int = Field(
        default=16,
        ge=1,
        le=200,
        description="PostgreSQL connections each process keeps open (and as many more under a burst)",
    )
    agreement_file: Path = Path("agreement.toml")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8443, ge=1, le=65535)
    key_dir: Path = Path("keys")
    tls_dir: Path = Path("tls")
    key_passphrase: SecretStr | None = None
    key_passphrase_file: Path | None = None
    partner_endpoint: str | None = Field(
        default=None, description="override of the partner endpoint named in the agreement"
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_head_bytes: int = Field(
        default=65_536,
        ge=8_192,
        description="the most bytes of URL and headers a request may carry (431 past it)",
    )
    max_requests_in_progress: int = Field(
        default=256,
        ge=1,
        description="requests a process serves at once from every caller but the partner node (503 past it)",
    )
    max_requests_in_progress_per_caller: int = Field(
        default=32, ge=1, description="requests a process serves at once for one client certificate"
    )
    max_partner_requests_in_progress: int = Field(
        default=8,
        ge=2,
        description="requests a process serves at once for the partner node (outside the total)",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how long a request's body may stall, nothing of it arriving (408 past it)",
    )
    clock_skew_seconds: int = Field(default=300, ge=0)
    replay_window_seconds: int = Field(default=30 * 86400, gt=0)
    delivery_batch_size: int = Field(default=64, ge=1, le=1000)
    delivery_poll_seconds: float = Field(default=0.2, gt=0)
    delivery_backoff_base_seconds: float = Field(default=0.5, gt=0)
    delivery_backoff_max_seconds: float = Field(
        default=10.0, gt=0, description="the longest wait between two probes of an unreachable partner"
    )
    delivery_lease_seconds: float = Field(default=60.0, gt=0)
    delivery_expiry_sweep_seconds: float = Field(
        default=1.0,
        gt=0,
        description="how often, at most, the delivery loop looks for messages past their deadline"
        " (a tenth of the expiry, if that is shorter): how late a message may end expired",
    )
    peer_timeout_seconds: float = Field(default=10.0, gt=0)
    checkpoint_interval_seconds: float = Field(default=5.0, gt=0)
    checkpoint_note_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        description="how long a process reuses the latest checkpoint it read for the messages it seals"
        " (never beyond half of clock_skew_seconds)",
    )
    client_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        description="PostgreSQL: how long a process reuses a local system's registration it read (0: read it"
        " on every request); a change by `exchange clients` makes every process forget it at once (NOTIFY)."
        " SQLite reads it on every request",
    )
    inbox_page_max: int = Field(default=100, ge=1, le=1000)
    inbox_scan_max: int = Field(default=2000, ge=1, description="messages one inbox pull examines at most")
    expiry_warning_days: int = Field(
        default=30, ge=1, description="flag keys and certificates expiring sooner"
    )
    tls_reload_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="how often each process checks whether its TLS certificate files were replaced",
    )
    client_certificate_overlap_hours: float = Field(
        default=24.0,
        ge=0,
        description="after `clients renew`, how long the previous certificate is still accepted",
    )
    retention_interval_seconds: float = Field(default=3600.0, gt=0, description="how often retention runs")
    deadline_interval_seconds: float = Field(
        default=60.0, gt=0, description="how often deadlines are checked"
    )
    case_view_max: int = Field(default=10_000, ge=1, description="messages one case view examines at most")
    log_level: LogLevel = "info"
    log_format: LogFormat = Field(
        default="json",
        description="how `exchange serve` logs: JSON lines (time, level, event, ids; never content) or text",
    )
    metrics_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        description="a scrape of /metrics reads the database at most this often per process",
    )
    delivery_max_wait_seconds: float = Field(
        default=7 * 86400,
        gt=0,
        description="an undelivered message ends `failed` (reason `expired`) after this long, or"
        " earlier if the partner's replay window (less the margin) is shorter",
    )
    delivery_expiry_margin_seconds: float = Field(
        default=600.0,
        ge=0,
        description="kept free before the replay window ends: clock difference plus transit time",
    )
    delivery_worker_id: str | None = Field(
        default=None,
        max_length=200,
        description="who holds outbox leases; default host name and node directory, so a restarted"
        " node recognises and takes back its own leases",
    )
    key_set_validity_days: int = Field(
        default=365, ge=1, description="how long an announced key set stays acceptable to the partner"
    )
    key_activation_wait_seconds: float = Field(
        default=86400.0,
        ge=0,
        description="`exchange keys activate --force` is allowed this long after the announcement"
        " the partner has not acknowledged",
    )
    key_destroy_grace_seconds: float = Field(
        default=86400.0,
        ge=0,
        description="an old encryption key is destroyed this long after the partner was first seen"
        " using its successor",
    )
    agreement_refresh_seconds: float = Field(
        default=5.0,
        gt=0,
        description="how old a process's view of the installed agreement versions may be (PostgreSQL also"
        " tells every process of an install at once)",
    )
    key_refresh_seconds: float = Field(
        default=1.0, gt=0, description="how old a process's view of the key sets may be"
    )
    key_fetch_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        description="the partner's key sets are fetched on an unknown key at most this often",
    )
    key_receipt_retry_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="the longest wait before announcing our key set again after the partner's receipts"
        " of it were refused in a row (the wait doubles from delivery_backoff_max_seconds)",
    )
    key_versions_per_day: int = Field(
        default=24, ge=1, description="the most versions of the partner's key set accepted in 24 hours"
    )
    key_maintenance_interval_seconds: float = Field(
        default=60.0, gt=0, description="how often retiring keys are checked for retirement"
    )
    leader_retry_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="how often a standby process tries to take over a singleton loop, and a leader"
        " checks its coordination connection (PostgreSQL): a dead leader is replaced within about this",
    )
    audit_verify_concurrency: int = Field(
        default=1,
        ge=1,
        le=16,
        description="whole-ledger verifications, and audit exports, the API runs at once (each);"
        " more answer 503",
    )
    audit_verify_workers: int = Field(
        default=2, ge=1, le=64, description="processes of the one pool that verifies the ledger for the API"
    )
    unavailable_retry_after_seconds: int = Field(
        default=5,
        ge=1,
        description="the Retry-After of a 503 while the database is unavailable or too many requests"
        " are in progress",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = init_settings.init_kwargs.get("node_dir")  # type: ignore[attr-defined]
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, Path(toml_file) / NODE_FILE))
        return tuple(sources)

    @model_validator(mode="after")
    def _resolve(self) -> NodeSettings:
        base = self.node_dir
        for name in ("agreement_file", "key_dir", "tls_dir"):
            value: Path = getattr(self, name)
            if not value.is_absolute():
                object.__setattr__(self, name, base / value)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{base / 'node.db'}")
        return self

    @property
    def clock_skew(self) -> dt.timedelta:
        """``clock_skew_seconds``: how far a partner's clock may be from ours."""
        return dt.timedelta(seconds=self.clock_skew_seconds)

    @property
    def replay_window(self) -> dt.timedelta:
        """``replay_window_seconds``: how old an envelope may be and still be opened."""
        return dt.timedelta(seconds=self.replay_window_seconds)

    @property
    def longest_wait(self) -> dt.timedelta:
        """The longest a message may wait for delivery plus the clock skew: how long what was sealed
        before a change stays acceptable (a retiring signing key, a superseded agreement version)."""
        return dt.timedelta(seconds=self.delivery_max_wait_seconds + self.clock_skew_seconds)

    def waited_out(self, ended: dt.datetime | None, now: dt.datetime) -> TypeGuard[dt.datetime]:
        """Whether ``ended`` (a key's end, an agreement version's supersession) is longer ago at
        ``now`` than anything sealed before it may wait: what claims to be signed before it is
        then refused, whatever its signing time says (the signer's word)."""
        return ended is not None and now > ended + self.longest_wait

    def passphrase(self) -> str:
        """The key passphrase, from ``EXCHANGE_KEY_PASSPHRASE`` or the secrets file.

        Raises:
            ConfigurationError: no passphrase, a placeholder, or one shorter than 12 characters.
        """
        secret = self.key_passphrase.get_secret_value() if self.key_passphrase is not None else None
        return resolve_passphrase(secret, self.key_passphrase_file)


def resolve_passphrase(value: str | None, file: Path | None) -> str:
    """The key passphrase given directly or in a secrets file, checked by :func:`check_passphrase`.

    Raises:
        ConfigurationError: neither given, the file unreadable, or the passphrase unusable.
    """
    if value is None and file is not None:
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read key passphrase file: {exc}") from exc
        except UnicodeDecodeError as exc:  # (its message would quote a byte of the passphrase)
            raise ConfigurationError(f"the key passphrase file {file} is not UTF-8 text") from exc
    if value is None:
        raise ConfigurationError(
            "no key passphrase: set EXCHANGE_KEY_PASSPHRASE or EXCHANGE_KEY_PASSPHRASE_FILE"
        )
    return check_passphrase(value)


def check_passphrase(value: str, what: str = "the key passphrase") -> str:
    """Return ``value`` if it is usable as a key passphrase, else raise ConfigurationError.

    Refused: a placeholder word, even with digits or punctuation around it (``password1234``);
    fewer than 12 characters; blank or padded with spaces; fewer than 8 distinct characters.
    """
    letters = re.sub(r"[^a-z]", "", value.lower())
    if letters in _PLACEHOLDERS:
        raise ConfigurationError(f"{what} is a placeholder; choose a real one")
    if len(value) < MIN_PASSPHRASE_LENGTH:
        raise ConfigurationError(f"{what} must have at least {MIN_PASSPHRASE_LENGTH} characters")
    if not value.strip() or value != value.strip():
        raise ConfigurationError(f"{what} must not be blank or begin or end with spaces")
    if len(set(value)) < MIN_PASSPHRASE_DISTINCT:
        raise ConfigurationError(f"{what} must have at least {MIN_PASSPHRASE_DISTINCT} distinct characters")
    return value


def load_settings(node_dir: Path, **overrides: Any) -> NodeSettings:
    """Load a node's settings from ``node_dir/node.toml`` and the environment.

    Raises:
        ConfigurationError: the directory is not an initialised node or a setting is invalid
            (every invalid setting named).
    """
    if not (node_dir / NODE_FILE).is_file():
        raise ConfigurationError(f"{node_dir} is not a node directory (no {NODE_FILE}); run `exchange init`")
    try:
        written = tomllib.loads((node_dir / NODE_FILE).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{node_dir / NODE_FILE} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{node_dir / NODE_FILE} is not UTF-8 text (byte {exc.start})") from exc
    if "key_passphrase" in written:
        raise ConfigurationError(
            f"{node_dir / NODE_FILE} holds key_passphrase: the passphrase must not sit beside the keys it"
            " protects (and travel with every copy of the node directory); remove it and set"
            " EXCHANGE_KEY_PASSPHRASE or key_passphrase_file"
        )
    try:
        return NodeSettings(node_dir=node_dir, **overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid settings in {node_dir / NODE_FILE}: {problems}") from exc
