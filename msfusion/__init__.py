"""msfusion: collaborative training of a large model across small edge boards."""

__version__ = "0.1.0"
