"""The command line (``qvlc.cli.app``), started by ``qvlc.cli.launch``: commands parse, print and pick exit codes;
the library below does the work. Importing this package imports nothing else (the launcher blocks signals
before any library loads)."""
