"""`msfusion security ...`: a fleet's TLS broker, credentials and revocations in one folder (coordinator/security).

    msfusion security init --out secure/ [--host 10.0.0.1 --host broker.lan] [--port 8883] [--password-port 8884]
    mosquitto -c secure/mosquitto.conf
    msfusion security enroll dev003 --dir secure/ [--password]
    msfusion security revoke dev003 --dir secure/ [--broker-pid PID]

Exit codes: 0 success, 2 config (a bad flag or id, a folder that is or is not a
security folder, a device already or not enrolled, a --broker-pid that is not mosquitto).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from msfusion.coordinator.cli.common import cli_errors, console

security_app = typer.Typer(
    no_args_is_help=True, help="TLS for the broker, per-device credentials, direction-specific ACLs, revocation."
)


def _line(label: str, value: object) -> None:
    console.print(Text.assemble((f"{label}: ", "bold"), str(value)), soft_wrap=True)


@security_app.command("init")
def security_init(
    out: Path = typer.Option(..., "--out", help="the folder to create (CA, broker config, credentials)"),
    host: Optional[List[str]] = typer.Option(
        None, "--host", help="a name or IP clients reach the broker by (repeat; default 127.0.0.1, localhost, hostname)"
    ),
    port: int = typer.Option(8883, "--port", help="the mutual-TLS listener (coordinator, certificate devices)"),
    password_port: int = typer.Option(8884, "--password-port", help="the TLS + password listener; 0 for none"),
    bind: Optional[str] = typer.Option(None, "--bind", help="the address the listeners bind (default: all)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="confine everyone to this run's topics"),
    coordinator: str = typer.Option("coordinator", "--coordinator", help="the coordinator's username (its CN)"),
) -> None:
    """Create a CA, the broker's certificate, the coordinator's identity, and mosquitto.conf with an ACL.

    Exit codes: 0 success, 2 config (OUT already holds a CA, a bad host, port or id).
    """
    from msfusion.coordinator.security import SecurityDir

    with cli_errors():
        sec = SecurityDir.init(
            out,
            host or None,
            port=port,
            password_port=password_port or None,
            bind=bind,
            coordinator=coordinator,
            run_id=run_id,
        )
    creds = sec.coordinator_credentials()
    _line("security folder", sec.path)
    _line("broker", f"mosquitto -c {sec.conf}  (mutual TLS on {sec.port}, passwords on {sec.password_port or 'none'})")
    _line("certificate hosts", ", ".join(sec.hosts))
    _line("coordinator", f"{creds.name}: --cert {creds.cert} --key {creds.key} --ca {creds.ca}")


@security_app.command("enroll")
def security_enroll(
    device_id: str = typer.Argument(..., help="the device id (its broker username)"),
    directory: Path = typer.Option(..., "--dir", help="the folder made by `msfusion security init`"),
    password: bool = typer.Option(False, "--password", help="a password instead of a client certificate"),
) -> None:
    """Give a device credentials and access to its own topics; SIGHUP a running broker afterwards.

    A password is printed once; only its hash is kept. Exit codes: 0 success, 2 config (not a
    security folder, a bad id, already enrolled, no password listener).
    """
    from msfusion.coordinator.security import SecurityDir

    with cli_errors():
        creds = SecurityDir(directory).enroll(device_id, "password" if password else "cert")
    _line("device", f"{creds.name} ({creds.kind}, broker port {creds.port})")
    _line("ca", creds.ca)
    if creds.kind == "cert":
        _line("cert", creds.cert)
        _line("key", creds.key)
    else:
        _line("username", creds.name)
        _line("password", creds.password)
    console.print("a running broker applies it after `kill -HUP <mosquitto pid>`")


@security_app.command("revoke")
def security_revoke(
    device_id: str = typer.Argument(..., help="the device to lock out"),
    directory: Path = typer.Option(..., "--dir", help="the folder made by `msfusion security init`"),
    broker_pid: Optional[int] = typer.Option(None, "--broker-pid", help="SIGHUP this mosquitto to apply it now"),
) -> None:
    """Take a device out of the ACL and the password file and put its certificate on the CRL.

    With --broker-pid the running broker re-reads them (SIGHUP): the run and every other client go
    on. Exit codes: 0 success, 2 config (not a security folder, the device is not enrolled, the pid
    is not a mosquitto process).
    """
    from msfusion.coordinator.security import SecurityDir, reload_broker
    from msfusion.coordinator.security.directory import check_broker_pid

    with cli_errors():
        sec = SecurityDir(directory)
        if broker_pid is not None:
            check_broker_pid(broker_pid)  # before revoking: a typo must not leave a revocation unapplied
        kind = sec.revoke(device_id)
        if broker_pid is not None:
            reload_broker(broker_pid)
    _line("revoked", f"{device_id} ({kind})")
    if broker_pid is None:
        console.print("a running broker applies it after `kill -HUP <mosquitto pid>`")
    else:
        console.print(Text(f"sent SIGHUP to {broker_pid}: the broker re-reads its password file, ACL and CRL"))
