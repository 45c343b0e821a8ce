"""Devices: board profiles, on-device profiling, flashing the runtime onto boards."""
