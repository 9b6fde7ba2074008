"""Test helpers: per-rank functions spawned ranks import by name, fakes, plug-ins for the CLI."""
