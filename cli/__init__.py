"""The ``labctl`` command line: one Click command per module, registered in ``cli.main``."""
