"""``python -m backchannel``."""

from backchannel.cli.main import main

main()
