"""The security folder: what init, enroll and revoke write, with which modes, and the CLI over it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from msfusion.coordinator.cli.main import app
from msfusion.coordinator.security import SecurityDir
from msfusion.coordinator.security.passwords import read_password_file, verify_password
from msfusion.errors import ConfigError
from msfusion.wire.signing import MessageSigner, MessageVerifier, ResultAuthenticator


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_the_ca_keys_config_and_acl_with_tight_modes(tmp_path: Path) -> None:
    # Execute
    sec = SecurityDir.init(tmp_path / "sec", ["10.0.0.1", "broker.lan"], run_id="fmnist")
    # Assert: secrets 0600, public files readable, SANs as given, the ACL confines to the run
    for secret in ("ca.key", "coordinator.key", "task-signing.key", "security.json"):
        assert _mode(sec.path / secret) == 0o600, secret
    assert _mode(sec.ca_cert) & 0o044 and _mode(sec.task_signing_public_key) & 0o044
    cert = x509.load_pem_x509_certificate(sec.broker_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lan"]
    conf = sec.conf.read_text()
    assert "allow_anonymous false" in conf and "tls_version tlsv1.2" in conf and "require_certificate true" in conf
    assert "topic readwrite msfusion/fmnist/#" in sec.acl_file.read_text()
    signer = MessageSigner.from_file(sec.task_signing_key)
    assert MessageVerifier.from_pem(str(sec.task_signing_public_key)) and signer.public_pem()
    with pytest.raises(ConfigError, match="already holds"):
        SecurityDir.init(tmp_path / "sec")


def test_enroll_and_revoke_a_certificate_and_a_password_device(tmp_path: Path) -> None:
    sec = SecurityDir.init(tmp_path / "sec", ["127.0.0.1"])
    # Execute: enroll one of each kind
    cert = sec.enroll("dev000")
    pw = sec.enroll("dev001", "password")
    # Assert: files, modes, ACL blocks, a hash the password verifies against, result keys
    assert cert.cert and cert.key and _mode(cert.key) == 0o600 and cert.result_key and _mode(cert.result_key) == 0o600
    assert pw.password and verify_password(pw.password, read_password_file(sec.password_file)["dev001"])
    acl = sec.acl_file.read_text()
    assert "topic write msfusion/+/dev/dev000/result" in acl and "topic read msfusion/+/dev/dev001/task" in acl
    assert "topic read msfusion/+/dev/dev000/result" not in acl and "topic write msfusion/+/dev/dev000/task" not in acl
    assert set(sec.result_authenticators()) == {"dev000", "dev001"}
    assert isinstance(ResultAuthenticator.from_text(str(cert.result_key)), ResultAuthenticator)
    assert sec.device_credentials("dev000").cert == cert.cert
    with pytest.raises(ConfigError, match="already enrolled"):
        sec.enroll("dev000")
    with pytest.raises(ConfigError, match="password"):
        sec.device_credentials("dev001")
    # Execute: revoke both
    assert sec.revoke("dev000") == "cert" and sec.revoke("dev001") == "password"
    # Assert: out of the ACL and the password file, certificate on the CRL, files gone
    acl = sec.acl_file.read_text()
    assert "dev000" not in acl and "dev001" not in acl and "dev001" not in read_password_file(sec.password_file)
    crl = x509.load_pem_x509_crl(sec.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial or 0) is not None
    assert not cert.key.exists() and not cert.result_key.exists() and sec.result_authenticators() == {}
    with pytest.raises(ConfigError, match="not enrolled"):
        sec.revoke("dev000")


def test_the_cli_inits_enrolls_and_revokes(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "sec"
    # Execute / Assert
    init = runner.invoke(app, ["security", "init", "--out", str(out), "--host", "127.0.0.1"])
    assert init.exit_code == 0, init.output
    enroll = runner.invoke(app, ["security", "enroll", "dev003", "--dir", str(out), "--password"])
    assert enroll.exit_code == 0 and "password:" in enroll.output
    again = runner.invoke(app, ["security", "enroll", "dev003", "--dir", str(out)])
    assert again.exit_code == 2 and "already enrolled" in again.output and "Traceback" not in again.output
    revoke = runner.invoke(app, ["security", "revoke", "dev003", "--dir", str(out), "--broker-pid", "1"])
    assert revoke.exit_code == 2 and "not mosquitto" in revoke.output
    assert "dev003" in SecurityDir(out).devices()  # a bad pid is refused before anything is revoked
    assert runner.invoke(app, ["security", "revoke", "dev003", "--dir", str(out)]).exit_code == 0
    assert SecurityDir(out).devices() == {}
