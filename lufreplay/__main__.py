"""python -m lufreplay."""

from lufreplay.cli import main

main()
