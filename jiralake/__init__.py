"""The ``jiralake`` command: one entry point for every service and operations tool."""
