"""``python -m lori``: the ``lori`` command (``lori.commands.main``)."""

from lori.commands.main import main

if __name__ == "__main__":
    main()
