"""The `gemma4` command line: a thin mapping of flags onto the library (`app.main`)."""
