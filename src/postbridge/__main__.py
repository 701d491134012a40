"""Allow ``python -m postbridge``."""

from postbridge.cli.main import main

main()
