"""`confide-simulate`: many virtual institutions on one machine (Flower's simulation engine)."""
