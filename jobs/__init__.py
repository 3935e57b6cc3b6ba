"""Command-line entry points. Each script is thin: arguments → validated config → one library call → summary."""
