"""The training supervisor: monitors -> policy -> actions, the logbook, and the process watchdog."""

# keel.config imports SupervisorConfig from policy.py, and policy.py imports `opt` from keel.config.
# Importing keel.config first makes that cycle resolve whichever module a caller imports first.
import keel.config  # noqa: F401
