"""``python -m solace ...``: the command line without the installed ``solace`` script."""

from solace.cli.main import main

if __name__ == "__main__":
    main()
