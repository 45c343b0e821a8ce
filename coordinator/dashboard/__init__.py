"""The operators' view: a read-only web dashboard over the coordinator's event stream (`fleet/events.py`)."""
