"""The training supervisor: monitors -> policy -> actions, the logbook, and the process watchdog."""
