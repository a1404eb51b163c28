"""``python -m solace ...``: the command line without the installed ``solace`` script."""

from solace.cli.main import app

if __name__ == "__main__":
    app(prog_name="solace")
