"""The ``lori`` command: one module per subcommand (``<subcommand>_command.py``), the LightningCLI
they share (``lightning_cli.py``) and the dispatcher (``main.py``, the ``lori`` console script).

Nothing is imported here, so importing one command loads only what that command needs.
"""
