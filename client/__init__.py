"""The institution: Flower ClientApp that trains locally with DP-SGD and never sends data."""
