"""Bad-input corpus: damaged files and records generated from the real data, each with its expected outcome."""
