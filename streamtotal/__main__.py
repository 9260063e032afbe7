"""``python -m streamtotal`` (and ``torchrun -m streamtotal``) runs the command line."""

from streamtotal.cli.main import main

if __name__ == "__main__":
    main()
