"""The process qvlc runs in: signals and the watchdog, third-party noise, glibc's heap, this machine's memory,
the crash log. Leaves: nothing here imports another qvlc package but ``qvlc.errors``."""
