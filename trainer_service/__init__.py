"""The trainer service: ingests the fleet's data, retrains, redistributes signed models."""
