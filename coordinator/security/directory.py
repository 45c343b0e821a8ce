"""`SecurityDir`: one folder holding a fleet's CA, broker config, credentials and revocations.

Layout (modes when created by root with a ``mosquitto`` user; owner in brackets)::

    DIR/                      0750 [root:mosquitto]  the broker may enter, nobody else
      security.json           0600  settings, enrolled devices, revoked serials
      ca.pem                  0644  the CA certificate: give it to every client
      ca.key                  0600  the CA key: signs certificates and the CRL; never leaves DIR
      crl.pem                 0644  revoked client certificate serials (Mosquitto `crlfile`)
      broker.pem              0644  the broker's server certificate (SANs: the hosts)
      broker.key              0600 [mosquitto]
      coordinator.pem/.key    0644/0600  the coordinator's client identity (CN = its username)
      task-signing.key/.pub   0600/0644  the coordinator's Ed25519 task-signing key (`msfusion/wire/signing.py`)
      devices/<id>.pem/.key   0644/0600  a certificate-enrolled device's identity (CN = device id)
      devices/<id>.result     0600  every enrolled device's result HMAC key (hex)
      passwd                  0600 [mosquitto]  password-enrolled devices ($7$ PBKDF2-SHA512 hashes)
      acl                     0640 [mosquitto]  who may read and write which topics
      mosquitto.conf          0640 [mosquitto]  run: mosquitto -c DIR/mosquitto.conf
      data/                   0700 [mosquitto]  the broker's persistence database

`enroll` and `revoke` rewrite passwd, acl and crl.pem; `reload_broker` (SIGHUP)
makes a running Mosquitto re-read them: it keeps its sessions and every other
client's connection, disconnects a password device that is no longer in the
password file, and refuses a revoked certificate at the next handshake.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

from msfusion.coordinator.security import broker_config, files, passwords, pki
from msfusion.errors import ConfigError
from msfusion.wire import signing

Kind = Literal["cert", "password"]

STATE = "security.json"
CA_CERT, CA_KEY = "ca.pem", "ca.key"
BROKER_CERT, BROKER_KEY = "broker.pem", "broker.key"
COORDINATOR_CERT, COORDINATOR_KEY = "coordinator.pem", "coordinator.key"
TASK_KEY, TASK_PUB = "task-signing.key", "task-signing.pub"
CRL = "crl.pem"
PASSWD = "passwd"
ACL = "acl"
CONF = "mosquitto.conf"
DEVICES = "devices"
DATA = "data"
_LOCK = ".lock"

DEFAULT_PORT = 8883  # mutual TLS: the coordinator and certificate devices
DEFAULT_PASSWORD_PORT = 8884  # TLS + password devices


@dataclass(frozen=True)
class Credentials:
    """What one client needs to log in to the broker.

    Attributes:
        name: the MQTT username (the device id, or the coordinator's name).
        kind: "cert" (mutual TLS on `port`) or "password" (TLS + password on `port`).
        port: the broker listener for this kind.
        ca: the CA certificate to verify the broker with.
        cert, key: the client certificate and key ("cert" only).
        password: the password in clear ("password" only; shown once, only its hash is kept).
        serial: the certificate's serial ("cert" only).
        result_key: the file holding the device's result HMAC key (devices only).
    """

    name: str
    kind: Kind
    port: int
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    password: str | None = None
    serial: int | None = None
    result_key: Path | None = None

    def transport_options(self) -> dict[str, Any]:
        """Keyword arguments for `MqttTransport` (TLS files, and username/password for "password")."""
        options: dict[str, Any] = {"tls_ca": str(self.ca)}
        if self.kind == "cert":
            options.update(tls_cert=str(self.cert), tls_key=str(self.key))
        else:
            options.update(username=self.name, password=self.password)
        return options


@dataclass
class _State:
    hosts: list[str]
    port: int
    password_port: int | None
    bind: str | None
    coordinator: str
    run_id: str | None
    broker_user: str | None
    coordinator_serial: int
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"kind", "serial"?, "enrolled"}
    revoked: list[dict[str, Any]] = field(default_factory=list)  # {"device_id", "kind", "serial"?, "revoked"}
    crl_number: int = 1

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"


def _timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def check_broker_pid(pid: int) -> None:
    """Check that `pid` is a running mosquitto (where /proc tells; elsewhere only that it is a number > 0).

    Raises:
        ConfigError: not a process id, no such process, or not mosquitto.
    """
    if not isinstance(pid, int) or pid < 1:
        raise ConfigError(f"a broker pid must be a process id, got {pid!r}")
    if not Path("/proc/self").exists():
        return
    comm = Path(f"/proc/{pid}/comm")
    try:
        name = comm.read_text(errors="replace").strip()
    except FileNotFoundError:
        raise ConfigError(f"no process {pid}") from None
    if "mosquitto" not in name:
        raise ConfigError(f"process {pid} is {name!r}, not mosquitto: not sending it SIGHUP")


def reload_broker(pid: int) -> None:
    """SIGHUP a running Mosquitto: it re-reads its config, password file, ACL and CRL without dropping the run.

    It keeps every session and every connection still allowed; a password client no longer in the
    password file is disconnected, a revoked certificate is refused at its next handshake.

    Raises:
        ConfigError: no such process, or (where /proc tells) the process is not mosquitto.
        PermissionError: the process belongs to another user.
    """
    check_broker_pid(pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise ConfigError(f"no process {pid}") from exc


class ResultKeys(Mapping[str, "signing.ResultAuthenticator"]):
    """The enrolled devices' result keys, read again (at most once a second) when a device's is missing.

    A device enrolled while a run goes on (`enroll`, then SIGHUP the broker) is admitted at its
    registration; its results must then check out too, without a coordinator restart. A revoked
    device's key stays in memory for the rest of the run, but the broker no longer lets it publish.
    """

    REREAD_S = 1.0

    def __init__(self, security: SecurityDir) -> None:
        self._path = security.path
        self._keys = security.result_authenticators()
        self._read_at = time.monotonic()

    def __getitem__(self, device_id: str) -> signing.ResultAuthenticator:
        if device_id not in self._keys and time.monotonic() - self._read_at >= self.REREAD_S:
            self._read_at = time.monotonic()
            self._keys = SecurityDir(self._path).result_authenticators()
        return self._keys[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class SecurityDir:
    """A fleet's security folder (see the module docstring); open one made by `SecurityDir.init`.

    Raises:
        ConfigError: `path` holds no security folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self._state = self._load()

    # ------------------------------------------------------------------ paths

    @property
    def ca_cert(self) -> Path:
        return self.path / CA_CERT

    @property
    def crl(self) -> Path:
        return self.path / CRL

    @property
    def broker_cert(self) -> Path:
        return self.path / BROKER_CERT

    @property
    def broker_key(self) -> Path:
        return self.path / BROKER_KEY

    @property
    def password_file(self) -> Path:
        return self.path / PASSWD

    @property
    def acl_file(self) -> Path:
        return self.path / ACL

    @property
    def conf(self) -> Path:
        return self.path / CONF

    @property
    def port(self) -> int:
        """The mutual-TLS listener's port."""
        return self._state.port

    @property
    def password_port(self) -> int | None:
        """The TLS + password listener's port (None: no such listener)."""
        return self._state.password_port

    @property
    def hosts(self) -> list[str]:
        return list(self._state.hosts)

    @property
    def coordinator_name(self) -> str:
        return self._state.coordinator

    @property
    def run_id(self) -> str | None:
        return self._state.run_id

    @property
    def task_signing_key(self) -> Path:
        return self.path / TASK_KEY

    @property
    def task_signing_public_key(self) -> Path:
        return self.path / TASK_PUB

    def result_key_file(self, device_id: str) -> Path:
        return self.path / DEVICES / f"{broker_config.check_id(device_id, 'device id')}.result"

    def result_authenticators(self) -> dict[str, signing.ResultAuthenticator]:
        """Every enrolled device's result key, by device id (a revoked device has none)."""
        return {
            device_id: signing.ResultAuthenticator.from_text(str(self.result_key_file(device_id)))
            for device_id in self.devices()
        }

    def device_files(self, device_id: str) -> tuple[Path, Path]:
        """(certificate, key) paths of a certificate device."""
        broker_config.check_id(device_id, "device id")
        return self.path / DEVICES / f"{device_id}.pem", self.path / DEVICES / f"{device_id}.key"

    # ------------------------------------------------------------------ creating

    @classmethod
    def init(
        cls,
        out: str | Path,
        hosts: Iterable[str] | None = None,
        *,
        port: int = DEFAULT_PORT,
        password_port: int | None = DEFAULT_PASSWORD_PORT,
        bind: str | None = None,
        coordinator: str = "coordinator",
        run_id: str | None = None,
        broker_user: str | None = files.BROKER_USER,
        log_dest: str = "stderr",
    ) -> SecurityDir:
        """Create a security folder: CA, broker certificate, coordinator identity, empty passwd/ACL/CRL, config.

        Args:
            out: the folder; it may exist but must not hold a CA already.
            hosts: names and IP addresses clients reach the broker by (the certificate's SANs);
                default 127.0.0.1, localhost and this machine's host name.
            port: the mutual-TLS listener (coordinator, certificate devices).
            password_port: the TLS + password listener; None for none (certificates only).
            bind: the address both listeners bind (None: every interface).
            coordinator: the coordinator's username (its certificate's CN).
            run_id: confine the coordinator and the devices to this run's topics (None: every run).
            broker_user: the user a root Mosquitto drops to; its files are chowned to it when we are root.
            log_dest: mosquitto.conf's ``log_dest``.

        Raises:
            ConfigError: `out` already holds a CA, a bad host, port, id or bind address.
        """
        path = Path(out).absolute()
        if (path / CA_KEY).exists() or (path / STATE).exists():
            raise ConfigError(f"{path} already holds a security folder (ca.key); remove it or use another --out")
        broker_config.check_id(coordinator, "coordinator name")
        if run_id is not None:
            broker_config.check_id(run_id, "run id")
        host_list = pki.default_hosts() if hosts is None else [h.strip() for h in hosts if h.strip()]
        listeners = [broker_config.Listener(port, "cert", bind)]
        if password_port is not None:
            listeners.append(broker_config.Listener(password_port, "password", bind))
        owner = files.broker_owner(broker_user)

        ca = pki.create_ca()
        server = pki.issue_server_cert(ca, host_list)  # ConfigError on a bad host, before anything is written
        client = pki.issue_client_cert(ca, coordinator)

        files.make_dir(path, 0o750 if owner else 0o700, owner, group_only=True)
        files.make_dir(path / DEVICES, 0o700)
        files.make_dir(path / DATA, 0o700, owner)
        files.write_file(path / CA_KEY, ca.key_pem(), files.SECRET)
        files.write_file(path / CA_CERT, ca.cert_pem(), files.PUBLIC)
        files.write_file(path / BROKER_KEY, server.key_pem(), files.SECRET, owner)
        files.write_file(path / BROKER_CERT, server.cert_pem(), files.PUBLIC)
        files.write_file(path / COORDINATOR_KEY, client.key_pem(), files.SECRET)
        files.write_file(path / COORDINATOR_CERT, client.cert_pem(), files.PUBLIC)
        files.write_file(path / CRL, pki.create_crl(ca, (), number=1), files.PUBLIC)
        signing.generate_signing_key(path / TASK_KEY, path / TASK_PUB)
        files.write_file(path / PASSWD, "", files.SECRET, owner)
        state = _State(
            hosts=host_list,
            port=port,
            password_port=password_port,
            bind=bind,
            coordinator=coordinator,
            run_id=run_id,
            broker_user=broker_user,
            coordinator_serial=client.serial,
        )
        files.write_file(path / ACL, broker_config.acl_text(coordinator, (), run_id), files.BROKER_CONFIG, owner)
        broker_files = broker_config.BrokerFiles(
            ca=path / CA_CERT,
            cert=path / BROKER_CERT,
            key=path / BROKER_KEY,
            crl=path / CRL,
            password_file=path / PASSWD,
            acl_file=path / ACL,
            persistence_dir=path / DATA,
        )
        conf = broker_config.mosquitto_conf(broker_files, listeners, log_dest=log_dest)
        files.write_file(path / CONF, conf, files.BROKER_CONFIG, owner)
        files.write_file(path / STATE, state.to_json(), files.SECRET)  # last: its presence means "complete"
        return cls(path)

    # ------------------------------------------------------------------ clients

    def coordinator_credentials(self) -> Credentials:
        """The coordinator's identity (mutual TLS on `port`)."""
        return Credentials(
            self._state.coordinator,
            "cert",
            self._state.port,
            self.ca_cert,
            self.path / COORDINATOR_CERT,
            self.path / COORDINATOR_KEY,
            serial=self._state.coordinator_serial,
        )

    def devices(self) -> dict[str, Kind]:
        """Enrolled (not revoked) device ids and their kinds."""
        return {device_id: entry["kind"] for device_id, entry in sorted(self._state.devices.items())}

    def device_credentials(self, device_id: str) -> Credentials:
        """An enrolled certificate device's credentials, from its files (a password is not kept: none for those).

        Raises:
            ConfigError: not enrolled, or enrolled with a password.
        """
        entry = self._state.devices.get(broker_config.check_id(device_id, "device id"))
        if entry is None:
            raise ConfigError(f"device {device_id!r} is not enrolled in {self.path} (`msfusion security enroll`)")
        if entry["kind"] != "cert":
            raise ConfigError(
                f"device {device_id!r} is enrolled with a password, which is not kept: revoke and enroll it again"
            )
        cert_path, key_path = self.device_files(device_id)
        return Credentials(
            device_id,
            "cert",
            self._state.port,
            self.ca_cert,
            cert_path,
            key_path,
            serial=entry.get("serial"),
            result_key=self.result_key_file(device_id),
        )

    def revoked_serials(self) -> list[int]:
        return sorted(int(entry["serial"]) for entry in self._state.revoked if entry.get("serial") is not None)

    def enroll(self, device_id: str, kind: Kind = "cert", *, password: str | None = None) -> Credentials:
        """Give a device credentials and access to its own topics (call `reload_broker` for a running broker).

        Args:
            device_id: the device (its MQTT username; `ID_PATTERN`).
            kind: "cert" (a client certificate, CN = device id, written to devices/<id>.pem/.key)
                or "password" (a random password unless given; only its hash is kept).
            password: the password to use for kind "password".

        Returns:
            The device's credentials (the password in clear, once).

        Raises:
            ConfigError: a bad id, the coordinator's name, already enrolled, no password listener,
                or a password given for kind "cert".
        """
        broker_config.check_id(device_id, "device id")
        if kind not in ("cert", "password"):
            raise ConfigError(f"kind must be 'cert' or 'password', got {kind!r}")
        if device_id == self._state.coordinator:
            raise ConfigError(f"{device_id!r} is the coordinator's username; a device needs another id")
        if kind == "cert" and password is not None:
            raise ConfigError("a password is for kind 'password' only")
        with self._locked():
            if device_id in self._state.devices:
                raise ConfigError(f"device {device_id!r} is already enrolled; revoke it first to replace it")
            owner = self._owner()
            entry: dict[str, Any] = {"kind": kind, "enrolled": _timestamp()}
            port = self._state.password_port
            if kind == "password" and port is None:
                raise ConfigError(f"{self.path} has no password listener: enroll with a certificate")
            result_key = self.result_key_file(device_id)
            signing.generate_result_key(result_key)
            if kind == "password":
                assert port is not None
                secret = password if password is not None else passwords.generate_password()
                entries = passwords.read_password_file(self.password_file)
                entries[device_id] = passwords.hash_password(secret)
                self._state.devices[device_id] = entry
                files.write_file(self.password_file, passwords.format_password_file(entries), files.SECRET, owner)
                self._write_acl(owner)
                self._save()
                return Credentials(device_id, "password", port, self.ca_cert, password=secret, result_key=result_key)
            identity = pki.issue_client_cert(self._ca(), device_id)
            cert_path, key_path = self.device_files(device_id)
            files.write_file(key_path, identity.key_pem(), files.SECRET)
            files.write_file(cert_path, identity.cert_pem(), files.PUBLIC)
            entry["serial"] = identity.serial
            self._state.devices[device_id] = entry
            self._write_acl(owner)
            self._save()
            return Credentials(
                device_id,
                "cert",
                self._state.port,
                self.ca_cert,
                cert_path,
                key_path,
                serial=identity.serial,
                result_key=result_key,
            )

    def revoke(self, device_id: str) -> Kind:
        """Take a device's access away: out of the ACL and the password file, its certificate on the CRL.

        Its key and certificate files are deleted. A running broker needs `reload_broker` to notice.

        Returns:
            The kind the device was enrolled with.

        Raises:
            ConfigError: the device is not enrolled.
        """
        broker_config.check_id(device_id, "device id")
        with self._locked():
            entry = self._state.devices.pop(device_id, None)
            if entry is None:
                raise ConfigError(f"device {device_id!r} is not enrolled in {self.path}")
            owner = self._owner()
            entries = passwords.read_password_file(self.password_file)
            if entries.pop(device_id, None) is not None:
                files.write_file(self.password_file, passwords.format_password_file(entries), files.SECRET, owner)
            record = {"device_id": device_id, "kind": entry["kind"], "revoked": _timestamp()}
            if entry.get("serial") is not None:
                record["serial"] = int(entry["serial"])
            self._state.revoked.append(record)
            self.result_key_file(device_id).unlink(missing_ok=True)
            self._write_acl(owner)
            if "serial" in record:
                self._state.crl_number += 1
                crl = pki.create_crl(self._ca(), self.revoked_serials(), number=self._state.crl_number)
                files.write_file(self.crl, crl, files.PUBLIC)
                for stale in self.device_files(device_id):
                    stale.unlink(missing_ok=True)
            self._save()
            return entry["kind"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ internals

    def _load(self) -> _State:
        try:
            raw = json.loads((self.path / STATE).read_text(encoding="utf-8"))
            return _State(**raw)
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a security folder (no {STATE}; see `msfusion security init`)")
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read {self.path / STATE}: {exc}") from exc

    def _save(self) -> None:
        files.write_file(self.path / STATE, self._state.to_json(), files.SECRET)

    def _owner(self) -> tuple[int, int] | None:
        return files.broker_owner(self._state.broker_user)

    def _ca(self) -> pki.Identity:
        return pki.load_identity(self.ca_cert, self.path / CA_KEY)

    def _write_acl(self, owner: tuple[int, int] | None) -> None:
        text = broker_config.acl_text(self._state.coordinator, self._state.devices, self._state.run_id)
        files.write_file(self.acl_file, text, files.BROKER_CONFIG, owner)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One enroll/revoke at a time (across processes); the state is re-read under the lock."""
        with os.fdopen(os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o600), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._state = self._load()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
