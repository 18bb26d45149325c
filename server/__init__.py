"""The coordinator: Flower ServerApp, aggregation strategy and job configuration."""
