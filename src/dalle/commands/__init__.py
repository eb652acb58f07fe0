"""Command-line groups: thin layers that parse options into configs and call the library."""
