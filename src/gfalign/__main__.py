"""``python -m gfalign``: the same as the ``gfalign`` command."""

from gfalign.cli import main

if __name__ == "__main__":
    main(prog_name="gfalign")
