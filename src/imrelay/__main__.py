"""``python -m imrelay``: the same as the ``imrelay`` command."""

from __future__ import annotations

from imrelay.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
