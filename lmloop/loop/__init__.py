"""The loop's own pieces: recipe, gate, judges and the simulated users."""
