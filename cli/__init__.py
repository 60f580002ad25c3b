"""`smelt` command line: Typer app, server supervisor, table rendering."""
