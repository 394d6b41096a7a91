"""The refground command line (installed as ``refground.cli``): thin Typer modules over the library."""
