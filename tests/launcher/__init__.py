"""tessera-serve and the supervised suite."""
