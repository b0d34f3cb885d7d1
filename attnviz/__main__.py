"""``python -m attnviz`` = the ``attnviz`` command."""

from attnviz.cli import main

if __name__ == "__main__":
    main()
