"""Broker security for a fleet: a small PKI, Mosquitto password files, a TLS broker config and ACL, one folder.

from msfusion.coordinator.security import SecurityDir, reload_broker

sec = SecurityDir.init("secure/", hosts=["10.0.0.1", "broker.lan"])   # then: mosquitto -c secure/mosquitto.conf
creds = sec.enroll("dev003")                      # devices/dev003.pem/.key; or kind="password"
sec.revoke("dev002"); reload_broker(broker_pid)    # SIGHUP: re-read passwd, ACL, CRL
"""

from msfusion.coordinator.security.directory import Credentials, ResultKeys, SecurityDir, reload_broker

__all__ = ["Credentials", "ResultKeys", "SecurityDir", "reload_broker"]
