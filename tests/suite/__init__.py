"""The whole suite under load, attack and faults."""
