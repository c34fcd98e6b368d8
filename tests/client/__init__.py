"""The tessera-client distribution."""
